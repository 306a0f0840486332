"""Fine-tune a MixLoRA adapter on a small instruction dataset and look at how the experts are used.

    python examples/train.py                              # tiny random Llama, a couple of minutes on a CPU
    python examples/train.py --model /path/to/llama-dir   # a local Hugging Face model and its tokenizer
    python examples/train.py --data my_data.jsonl         # one {"instruction", "input", "output"} per line

Without --data it trains on a few hundred instructions generated here (string and arithmetic
tasks), so nothing is downloaded. It logs the LM loss, the router aux loss and the load of each
expert, saves the adapter to OUTPUT/adapter (load it back with `mixlora_ext.load_adapter`) and
draws the expert load per layer to OUTPUT/expert_load.png.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import string

import torch
from tqdm import tqdm

from mixlora_ext import MixLoRAConfig, expert_load, inject_mixlora, router_aux_loss, save_adapter

PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


# --- data -------------------------------------------------------------------------------------
def toy_instructions(count: int, seed: int = 0) -> list[dict]:
    """`count` instruction / input / output triples from a handful of string and arithmetic tasks."""
    rng = random.Random(seed)

    def word():
        return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 7)))

    def add():
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        return "Add the two numbers.", f"{a} {b}", str(a + b)

    tasks = [
        lambda: (lambda w: ("Reverse the word.", w, w[::-1]))(word()),
        lambda: (lambda w: ("Write the word in capital letters.", w, w.upper()))(word()),
        lambda: (lambda w: ("Sort the letters of the word.", w, "".join(sorted(w))))(word()),
        lambda: (lambda w: ("Count the letters of the word.", w, str(len(w))))(word()),
        lambda: (lambda w: ("Repeat the word twice.", w, f"{w} {w}"))(word()),
        add,
    ]
    return [dict(zip(("instruction", "input", "output"), rng.choice(tasks)())) for _ in range(count)]


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for i, row in enumerate(rows):
        if not {"instruction", "output"} <= row.keys():
            raise ValueError(f"{path}:{i + 1}: needs 'instruction' and 'output' (and optionally 'input')")
    return rows


class ByteTokenizer:
    """Bytes as tokens (ids 3..258) plus pad 0, bos 1, eos 2: enough for a model built from scratch."""

    pad_token_id, bos_token_id, eos_token_id, vocab_size = 0, 1, 2, 259

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer behind ByteTokenizer's interface (encode without special tokens)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.bos_token_id, self.eos_token_id = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def prompt_ids(row, tokenizer) -> list[int]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer.encode(PROMPT.format(instruction=row["instruction"], input=row.get("input", "")))


def tokenize(rows, tokenizer, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row; the prompt is masked out of the labels (-100)."""
    examples = []
    for row in rows:
        prompt = prompt_ids(row, tokenizer)
        answer = tokenizer.encode(row["output"]) + [tokenizer.eos_token_id]
        examples.append(((prompt + answer)[:max_len], ([-100] * len(prompt) + answer)[:max_len]))
    return examples


def collate(examples, pad_id: int) -> dict:
    """Right-padded input_ids / attention_mask / labels."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(lab)] = torch.tensor(lab)
        attention_mask[row, :len(ids)] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


# --- model ------------------------------------------------------------------------------------
def load_model(args):
    """(model, tokenizer): a local model, or a tiny random Llama with the byte tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model:
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype), HFTokenizer(args.model)
    tokenizer = ByteTokenizer()
    # initializer_range 0.1 rather than 0.02: the frozen random lm_head must be able to produce a
    # peaked distribution at all, or no adapter could bring the loss down much.
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=172,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.1,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config), tokenizer


# --- plot -------------------------------------------------------------------------------------
def plot_expert_load(load: torch.Tensor, path: str) -> None:
    """Heat map of the share of routed tokens per layer (rows) and expert (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, experts = load.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * experts, 1.0 + 0.45 * layers))
    image = ax.imshow(100 * load.numpy(), cmap="viridis", vmin=0, aspect="auto")
    for i in range(layers):
        for e in range(experts):
            ax.text(e, i, f"{100 * load[i, e]:.0f}", ha="center", va="center", color="white", fontsize=8)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(experts))
    ax.set_yticks(range(layers))
    ax.set_title(f"Expert load (% of routed tokens; balanced = {100 / experts:.3g}%)")
    fig.colorbar(image, ax=ax, label="%")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- training ---------------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local Hugging Face model folder (Llama, Mistral or Qwen2); "
                                        "default: a tiny random Llama")
    parser.add_argument("--data", help="JSON lines with instruction / input / output; default: generated tasks")
    parser.add_argument("--examples", type=int, default=400, help="generated examples (without --data)")
    parser.add_argument("--output", default="mixlora_output")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--aux-coef", type=float, default=0.01, help="router_aux_loss_coef")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args)
    config = MixLoRAConfig(num_experts=args.experts, top_k=args.top_k, r=args.rank, lora_alpha=2 * args.rank,
                           lora_dropout=0.05, router_aux_loss_coef=args.aux_coef,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = inject_mixlora(model, config).to(args.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__}: {sum(p.numel() for p in trainable):,} trainable of {total:,} parameters")

    rows = read_jsonl(args.data) if args.data else toy_instructions(args.examples, args.seed)
    held_out, rows = rows[:1], rows[1:]
    examples = tokenize(rows, tokenizer, args.max_len)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    steps_per_epoch = (len(examples) + args.batch_size - 1) // args.batch_size
    num_layers = len(model.model.layers)
    load_sum = torch.zeros(num_layers, args.experts)

    model.train()
    progress = tqdm(total=args.epochs * steps_per_epoch, desc="training", unit="step")
    window_lm = window_aux = 0.0   # sums since the last log line
    for epoch in range(args.epochs):
        random.Random(args.seed + epoch).shuffle(examples)
        for start in range(0, len(examples), args.batch_size):
            batch = {k: v.to(args.device) for k, v in
                     collate(examples[start:start + args.batch_size], tokenizer.pad_token_id).items()}
            outputs = model(**batch)
            aux = router_aux_loss(model, batch["attention_mask"])     # already times router_aux_loss_coef
            (outputs.loss + aux).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            load = expert_load(model, batch["attention_mask"]).float().cpu()   # [layers, experts]
            load_sum += load
            lm_value, aux_value = outputs.loss.item(), aux.item()
            window_lm, window_aux = window_lm + lm_value, window_aux + aux_value
            progress.update()
            progress.set_postfix(lm=f"{lm_value:.3f}", aux=f"{aux_value:.4f}")
            if progress.n % args.log_every == 0 or progress.n == progress.total:
                steps = (progress.n - 1) % args.log_every + 1
                shares = " | ".join(" ".join(f"{100 * x:2.0f}" for x in row) for row in load)
                progress.write(f"step {progress.n:4d}  lm {window_lm / steps:.4f}  aux {window_aux / steps:.5f}  "
                               f"expert load % (layer by layer): {shares}")
                window_lm = window_aux = 0.0
    progress.close()

    model.eval()
    os.makedirs(args.output, exist_ok=True)
    save_adapter(model, os.path.join(args.output, "adapter"))
    plot_expert_load(load_sum / progress.n, os.path.join(args.output, "expert_load.png"))
    print(f"adapter saved to {os.path.join(args.output, 'adapter')}; "
          f"expert load plot in {os.path.join(args.output, 'expert_load.png')}")

    example = held_out[0]
    prompt = prompt_ids(example, tokenizer)
    with torch.no_grad():
        generated = model.generate(torch.tensor([prompt], device=args.device), max_new_tokens=24, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(generated[0, len(prompt):].tolist())
    print(f"held-out: {example['instruction']} {example.get('input', '')!r} -> {answer.strip()!r} "
          f"(expected {example['output']!r})")


if __name__ == "__main__":
    main()
