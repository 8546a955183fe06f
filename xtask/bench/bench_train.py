"""Python side of `cargo xtask bench-train`.

  make-model  a Qwen3-shaped model (~28M parameters: SmolLM2's 49,152-token vocabulary, hidden
              384, 6 layers, 6 query / 2 key-value heads of 64, MLP 1024, tied embeddings) with
              `transformers`' random initialisation, saved in fp32 beside SmolLM2's tokenizer
  make-data   long `messages` conversations from chatterbot-corpus (BSD), every one longer
              than the benchmark's sequence, so that each truncated example is exactly that long
  torch       the same fine-tuning job in PyTorch + `transformers` eager: same model files, same
              rows (the chat template rendered by `transformers`, truncated), same order, same
              AdamW hyper-parameters and clipping; prints one JSON line of per-step times
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

SHAPES = {
    "qwen3-30m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=64),
}


def make_model(shape, tokenizer_dir, out):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    tok_cfg = json.loads((tokenizer_dir / "config.json").read_text())
    config = Qwen3Config(
        vocab_size=tok_cfg["vocab_size"], max_position_embeddings=2048, rms_norm_eps=1e-6,
        rope_theta=1_000_000.0, tie_word_embeddings=True, bos_token_id=tok_cfg.get("bos_token_id"),
        eos_token_id=tok_cfg.get("eos_token_id"), pad_token_id=tok_cfg.get("pad_token_id"),
        **SHAPES[shape])
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors", "generation_config.json") \
                and not f.name.endswith((".gguf", ".safetensors")):
            shutil.copy(f, out / f.name)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {shape} ({n:,} parameters) to {out}", file=sys.stderr)


def make_data(assets, out, rows, min_chars):
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_data import corpus_conversations
    turns = [t for c in corpus_conversations(assets) for t in c]
    n = len(turns)
    with open(out, "w") as f:
        k = 0
        for i in range(rows):
            msgs, chars = [], 0
            while chars < min_chars or len(msgs) % 2:
                t = turns[(k * 7919 + i) % n]
                k += 1
                msgs.append({"role": "user" if len(msgs) % 2 == 0 else "assistant", "content": t})
                chars += len(t)
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    print(f"wrote {rows} conversations of >= {min_chars} characters to {out}", file=sys.stderr)


def peak_rss_bytes():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def torch_run(model_dir, data, steps, warmup, batch, seq, lr, weight_decay, max_grad_norm, attn):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    with open(data) as f:
        for line in f:
            text = tok.apply_chat_template(json.loads(line)["messages"], tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if len(ids) < seq:
                sys.exit(f"{data}: a row has {len(ids)} tokens, fewer than {seq}")
            rows.append(ids[:seq])
    need = (steps + warmup) * batch
    if len(rows) < need:
        sys.exit(f"{data}: {len(rows)} rows, {need} needed")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    model.train()
    # Hugging Face Trainer's grouping: no decay on biases and norms.
    decay = [p for _, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999), eps=1e-8)
    step_seconds, losses, grad_norms = [], [], []
    for step in range(steps + warmup):
        x = torch.tensor(rows[step * batch:(step + 1) * batch], dtype=torch.long)
        t0 = time.perf_counter()
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        step_seconds.append(time.perf_counter() - t0)
        losses.append(loss)
    print(json.dumps({
        "step_seconds": step_seconds, "losses": losses, "grad_norms": grad_norms, "tokens_per_step": batch * seq,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "attention": attn,
        "peak_rss_bytes": peak_rss_bytes(),
    }))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("--shape", default="qwen3-30m", choices=sorted(SHAPES))
    m.add_argument("--tokenizer-dir", type=Path, required=True)
    m.add_argument("--out", type=Path, required=True)
    d = sub.add_parser("make-data")
    d.add_argument("--assets", type=Path, required=True)
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--rows", type=int, required=True)
    d.add_argument("--min-chars", type=int, default=4000)
    t = sub.add_parser("torch")
    t.add_argument("--model", type=Path, required=True)
    t.add_argument("--data", type=Path, required=True)
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--warmup", type=int, required=True)
    t.add_argument("--batch", type=int, required=True)
    t.add_argument("--seq", type=int, required=True)
    t.add_argument("--lr", type=float, required=True)
    t.add_argument("--weight-decay", type=float, required=True)
    t.add_argument("--max-grad-norm", type=float, required=True)
    t.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    a = p.parse_args()
    if a.cmd == "make-model":
        make_model(a.shape, a.tokenizer_dir, a.out)
    elif a.cmd == "make-data":
        make_data(a.assets, a.out, a.rows, a.min_chars)
    else:
        torch_run(a.model, a.data, a.steps, a.warmup, a.batch, a.seq, a.lr, a.weight_decay,
                  a.max_grad_norm, a.attn)


if __name__ == "__main__":
    main()
