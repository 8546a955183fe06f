"""TRL's GRPO generation on the same model, prompts and settings as `train grpo`: completion
tokens per second of `GRPOTrainer._generate_single_turn` (transformers `generate`, sampling, the
path TRL takes without vLLM). Used by `cargo xtask bench-grpo`; prints one JSON line."""

import argparse
import json
import tempfile
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True, help="JSON lines with a `prompt` list of messages")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2, help="prompts per generation batch")
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rows = [json.loads(l) for l in open(args.prompts) if l.strip()]
    g = args.num_generations
    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(output_dir=tmp, report_to="none", use_cpu=True, bf16=False,
                            per_device_train_batch_size=args.batch_size * g, num_generations=g,
                            max_completion_length=args.max_new_tokens, temperature=1.0)
        trainer = GRPOTrainer(model=model, args=config, processing_class=tok,
                              reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                              train_dataset=Dataset.from_list([{"prompt": r["prompt"]} for r in rows]))
        trainer.model.train()
        out = []
        for b in range(args.batches + 1):
            batch = rows[b * args.batch_size:(b + 1) * args.batch_size]
            ids = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                           return_dict=False) for r in batch]
            ids = [i["input_ids"] if isinstance(i, dict) else i for i in ids]
            repeated = [i for i in ids for _ in range(g)]
            started = time.perf_counter()
            completions, _ = trainer._generate_single_turn(repeated, None, {}, g)
            seconds = time.perf_counter() - started
            tokens = sum(len(c) for c in completions)
            if b > 0:  # the first batch warms up
                out.append({"tokens": tokens, "seconds": seconds})
    tokens = sum(r["tokens"] for r in out)
    seconds = sum(r["seconds"] for r in out)
    import trl
    print(json.dumps({"batches": out, "tokens": tokens, "seconds": seconds, "trl": trl.__version__,
                      "tokens_per_sec": tokens / seconds, "torch": torch.__version__,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
