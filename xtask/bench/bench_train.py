"""Python side of `cargo xtask bench-train`.

  make-model  a Qwen3-shaped model (~28M parameters: SmolLM2's 49,152-token vocabulary, hidden
              384, 6 layers, 6 query / 2 key-value heads of 64, MLP 1024, tied embeddings) with
              `transformers`' random initialisation, saved in fp32 beside SmolLM2's tokenizer;
              or the same shape in another family (`--shape gemma3-30m`, `olmo2-30m`,
              `smollm3-30m`, `mistral-30m`, `phi3-30m`, `qwen3_moe-30m`: each with its own
              layer kind, sliding windows of 128 tokens where the family has them)
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

QWEN3_30M = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                 num_attention_heads=6, num_key_value_heads=2, head_dim=64)
# model_type and configuration keys of each shape: the Qwen3 one, and the same size in the
# other families (their own layer kinds; windows shorter than the benchmark's rows).
SHAPES = {
    "qwen3-30m": ("qwen3", QWEN3_30M),
    "gemma3-30m": ("gemma3_text", dict(QWEN3_30M, query_pre_attn_scalar=64, sliding_window=128)),
    "olmo2-30m": ("olmo2", {k: v for k, v in QWEN3_30M.items() if k != "head_dim"}),
    "smollm3-30m": ("smollm3", {k: v for k, v in QWEN3_30M.items() if k != "head_dim"}),
    "mistral-30m": ("mistral", dict(QWEN3_30M, sliding_window=128)),
    # Phi-4-mini's kind: fused qkv_proj / gate_up_proj, 3/4 of each head rotated, LongRoPE
    # (within its pre-training context of 1024 at the benchmark's 512 tokens: short factors).
    "phi3-30m": ("phi3", dict({k: v for k, v in QWEN3_30M.items() if k != "head_dim"},
                              partial_rotary_factor=0.75, original_max_position_embeddings=1024,
                              rope_scaling={"rope_type": "longrope", "short_factor": [1.0 + i / 48 for i in range(24)],
                                            "long_factor": [2.0 + i / 4 for i in range(24)]})),
    # Qwen3-30B-A3B's kind: 8 experts of 256, two per token (renormalised) on every layer.
    "qwen3_moe-30m": ("qwen3_moe", dict(QWEN3_30M, num_experts=8, num_experts_per_tok=2,
                                        moe_intermediate_size=256, norm_topk_prob=True)),
}


def make_model(shape, tokenizer_dir, out):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    tok_cfg = json.loads((tokenizer_dir / "config.json").read_text())
    model_type, keys = SHAPES[shape]
    config = AutoConfig.for_model(
        model_type,
        vocab_size=tok_cfg["vocab_size"], max_position_embeddings=2048, rms_norm_eps=1e-6,
        rope_theta=1_000_000.0, tie_word_embeddings=True, bos_token_id=tok_cfg.get("bos_token_id"),
        eos_token_id=tok_cfg.get("eos_token_id"), pad_token_id=tok_cfg.get("pad_token_id"),
        **keys)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors", "generation_config.json") \
                and not f.name.endswith((".gguf", ".safetensors")):
            shutil.copy(f, out / f.name)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {shape} ({n:,} parameters) to {out}", file=sys.stderr)


def make_data(assets, out, rows, min_chars, max_chars=None):
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_data import corpus_conversations
    turns = [t for c in corpus_conversations(assets) for t in c]
    n = len(turns)
    with open(out, "w") as f:
        k = 0
        for i in range(rows):
            msgs, chars = [], 0
            # With --max-chars, each row's length is spread between the two (a fixed hash of i).
            want = min_chars if max_chars is None else \
                min_chars + (i * 2654435761 % 4294967296) % max(1, max_chars - min_chars)
            while chars < want or len(msgs) % 2:
                t = turns[(k * 7919 + i) % n]
                k += 1
                msgs.append({"role": "user" if len(msgs) % 2 == 0 else "assistant", "content": t})
                chars += len(t)
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    print(f"wrote {rows} conversations of >= {min_chars} characters to {out}", file=sys.stderr)


def peak_rss_bytes():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(model_dir, r, out):
    """A fresh PEFT LoRA adapter (rank r, alpha 2r, every projection, seed 0) for the model, so
    that `train` and `peft` start the LoRA job from the same A matrices."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(Path(model_dir).resolve())
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "README.md").unlink(missing_ok=True)


def torch_run(model_dir, data, steps, warmup, batch, seq, lr, weight_decay, max_grad_norm, attn, adapter=None,
              profile=None, padded=False, checkpointing=False):
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
            if len(ids) < seq and not padded:
                sys.exit(f"{data}: a row has {len(ids)} tokens, fewer than {seq}")
            rows.append(ids[:seq])
    need = (steps + warmup) * batch
    if len(rows) < need:
        sys.exit(f"{data}: {len(rows)} rows, {need} needed")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    if checkpointing:
        # What `TrainingArguments(gradient_checkpointing=True)` does, non-reentrant as the
        # Trainer recommends (no input-gradient hook needed with a frozen embedding).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Hugging Face Trainer's grouping: no decay on biases and norms.
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999), eps=1e-8)
    step_seconds, losses, grad_norms, step_tokens, step_positions = [], [], [], [], []
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    for step in range(steps + warmup):
        part = rows[step * batch:(step + 1) * batch]
        # Padded to the longest row of the batch (DataCollatorForLanguageModeling): attention
        # mask 0 and labels -100 on the padding.
        longest = max(len(r) for r in part)
        x = torch.tensor([r + [pad_id] * (longest - len(r)) for r in part], dtype=torch.long)
        mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in part], dtype=torch.long)
        labels = x.masked_fill(mask == 0, -100)
        step_tokens.append(sum(len(r) for r in part))
        step_positions.append(len(part) * longest)
        # `--profile`: the first timed step runs under torch.profiler (its time is not counted
        # in a separate run's figures: profile and measure in different invocations).
        prof = None
        if profile is not None and step == warmup:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            prof.__enter__()
        t0 = time.perf_counter()
        if padded:
            out = model(input_ids=x, attention_mask=mask, labels=labels)
        else:
            out = model(input_ids=x, labels=x)
        out.loss.backward()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        step_seconds.append(time.perf_counter() - t0)
        losses.append(loss)
        if prof is not None:
            prof.__exit__(None, None, None)
            Path(profile).write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30) + "\n")
    print(json.dumps({
        "step_seconds": step_seconds, "losses": losses, "grad_norms": grad_norms, "tokens_per_step": batch * seq,
        "step_tokens": step_tokens, "step_positions": step_positions,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "attention": attn,
        "peak_rss_bytes": peak_rss_bytes(), "trainable_parameters": sum(p.numel() for p in trainable),
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
    d.add_argument("--max-chars", type=int, help="spread the rows' lengths between --min-chars and this")
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
    t.add_argument("--adapter", type=Path, help="train this PEFT LoRA adapter on the frozen model")
    t.add_argument("--profile", type=Path, help="write torch.profiler's table of the first timed step here")
    t.add_argument("--padded", action="store_true", help="rows of their own lengths, padded to the longest of each batch")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer in the backward pass")
    l = sub.add_parser("make-adapter")
    l.add_argument("--model", type=Path, required=True)
    l.add_argument("--r", type=int, required=True)
    l.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    if a.cmd == "make-model":
        make_model(a.shape, a.tokenizer_dir, a.out)
    elif a.cmd == "make-data":
        make_data(a.assets, a.out, a.rows, a.min_chars, a.max_chars)
    elif a.cmd == "make-adapter":
        make_adapter(a.model, a.r, a.out)
    else:
        torch_run(a.model, a.data, a.steps, a.warmup, a.batch, a.seq, a.lr, a.weight_decay,
                  a.max_grad_norm, a.attn, a.adapter, a.profile, a.padded, a.gradient_checkpointing)


if __name__ == "__main__":
    main()
