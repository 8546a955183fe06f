"""Greedy decoding speed of transformers `generate` (PyTorch, CPU), the reference side of
`cargo xtask bench-generate`. Prints one JSON object: per prompt, the generated ids and seconds."""

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("prompts", nargs="+")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    rows = []
    with torch.no_grad():
        for i, q in enumerate(args.prompts):
            ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
            if i == 0:
                model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
            secs = time.perf_counter() - t
            rows.append({"prompt": q, "token_ids": out[0, ids.shape[1]:].tolist(), "seconds": secs})
    print(json.dumps({"torch": torch.__version__, "threads": args.threads, "rows": rows}))


if __name__ == "__main__":
    main()
