"""Python side of `cargo xtask bench-data`.

  gen     expand chatterbot-corpus (BSD) into a >= 24k-row `messages` JSONL dataset
  run     tokenize it the way Python users do: `datasets` + `map` + `apply_chat_template` +
          the tokenizer, with assistant-only labels (the contract's rule), and time it
  compare check that train-data's Parquet output has the same ids and labels for every row
"""

import argparse
import glob
import json
import sys
import time
import zipfile
from pathlib import Path


def corpus_conversations(assets):
    """The English conversations of chatterbot-corpus, each cut to an even number of turns."""
    import yaml
    wheel = glob.glob(str(assets / "chatterbot_corpus-*.whl"))[0]
    z = zipfile.ZipFile(wheel)
    convs = []
    for name in sorted(z.namelist()):
        if "/english/" in name and name.endswith(".yml"):
            for c in yaml.safe_load(z.read(name))["conversations"]:
                c = [str(x) for x in c]
                if len(c) >= 2 and all(x.strip() for x in c):
                    convs.append(c[: len(c) // 2 * 2])
    return convs


def gen(assets, out, rows):
    convs = corpus_conversations(assets)
    n = len(convs)
    with open(out, "w") as f:
        for i in range(rows):
            a, b = convs[i % n], convs[(i * 7 + 3) % n]
            turns = a + b if i % 2 else a
            msgs = [{"role": "system", "content": "You are a friendly assistant."}] if i % 3 == 0 else []
            msgs += [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(turns)]
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    print(f"wrote {rows} rows from {n} chatterbot conversations to {out}", file=sys.stderr)


def labels_for(tok, messages, eot_text):
    text = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [-100] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        found = text.find(eot_text, start)
        end = found + len(eot_text) if found >= 0 else len(text)
        for t, (a, b) in enumerate(offsets):
            if start <= a < end and b > a:
                labels[t] = ids[t]
    return ids, labels


def run(model, data, num_proc, out):
    import datasets
    from transformers import AutoTokenizer
    datasets.disable_caching()
    datasets.logging.set_verbosity_error()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model)
    ds = datasets.load_dataset("json", data_files=str(data), split="train", keep_in_memory=True)

    def fn(row):
        ids, labels = labels_for(tok, row["messages"], "<|im_end|>")
        return {"input_ids": ids, "labels": labels}

    mapped = ds.map(fn, num_proc=num_proc, remove_columns=ds.column_names, keep_in_memory=True, load_from_cache_file=False)
    seconds = time.perf_counter() - t0
    mapped.to_parquet(str(out))
    result = {"rows": len(mapped), "seconds": seconds, "rows_per_sec": len(mapped) / seconds, "num_proc": num_proc,
              "datasets": datasets.__version__}
    print(json.dumps(result))


def compare(python_parquet, rust_dir):
    import pyarrow.parquet as pq
    py = pq.read_table(python_parquet).to_pydict()
    rust = pq.read_table(Path(rust_dir) / "train.parquet").to_pydict()
    by_row = {r: (ids, labels) for r, ids, labels in zip(rust["row"], rust["input_ids"], rust["labels"])}
    assert len(by_row) == len(py["input_ids"]), f"{len(by_row)} rows from Rust, {len(py['input_ids'])} from Python"
    for i, (ids, labels) in enumerate(zip(py["input_ids"], py["labels"])):
        rids, rlabels = by_row[i]
        assert list(rids) == list(ids), f"row {i}: token ids differ"
        assert list(rlabels) == list(labels), f"row {i}: labels differ"
    print(json.dumps({"identical_rows": len(by_row)}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("--assets", type=Path, required=True)
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--rows", type=int, default=20000)
    r = sub.add_parser("run")
    r.add_argument("--model", type=Path, required=True)
    r.add_argument("--data", type=Path, required=True)
    r.add_argument("--num-proc", type=int, default=2)
    r.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("compare")
    c.add_argument("--python", type=Path, required=True)
    c.add_argument("--rust", type=Path, required=True)
    a = ap.parse_args()
    if a.cmd == "gen":
        gen(a.assets, a.out, a.rows)
    elif a.cmd == "run":
        run(a.model, a.data, a.num_proc, a.out)
    else:
        compare(a.python, a.rust)
