"""Training memory of MoLF-Efficient (ranks 16 + 128 on the 7 projections, base frozen) with a bf16 base
and with a 4-bit base (bitsandbytes nf4 with double quantization, the QLoRA recipe), by counting bytes:
parameters, gradients, Adam moments and the frozen base, activations excluded. Run: python bench/memory.py"""

# hidden, intermediate, layers, attention heads, kv heads, head dim, vocab, tied embeddings
MODELS = {
    "Qwen2.5-1.5B": (1536, 8960, 28, 12, 2, 128, 151936, True),
    "Qwen2.5-3B": (2048, 11008, 36, 16, 2, 128, 151936, True),
    "Qwen2.5-7B": (3584, 18944, 28, 28, 4, 128, 152064, False),
}
RANKS = (16, 128)
GB = 1e9


def projections(hidden, inter, heads, kv, head_dim):
    """(N, K) of the 7 projections of one decoder layer."""
    q, k = heads * head_dim, kv * head_dim
    return [(q, hidden), (k, hidden), (k, hidden), (hidden, q), (inter, hidden), (inter, hidden), (hidden, inter)]


def bytes_per_weight_nf4(double_quant=True, block=64, block2=256):
    """nf4: 4 bits per weight plus one absmax per block of 64 (fp32, or 8 bits with one fp32 per 256 blocks)."""
    absmax = (1 + 4 / block2) / block if double_quant else 4 / block
    return 0.5 + absmax


def table():
    rows = []
    for name, (h, i, layers, heads, kv, hd, vocab, tied) in MODELS.items():
        shapes = projections(h, i, heads, kv, hd) * layers
        base = sum(n * k for n, k in shapes)
        lora = sum(sum(RANKS) * (n + k) for n, k in shapes)
        other = vocab * h * (1 if tied else 2) + layers * 2 * h + h + layers * (heads + 2 * kv) * hd  # embeddings, norms, qkv bias
        trained = 2 * lora + 2 * lora + 8 * lora  # bf16 experts, bf16 gradients, two fp32 moments (state_dtype=torch.float32)
        for base_kind, per_weight in (("bf16", 2.0), ("nf4 + double quant", bytes_per_weight_nf4())):
            frozen = base * per_weight + 2 * other
            rows.append((name, base_kind, base / 1e9, lora / 1e6, frozen / GB, trained / GB, (frozen + trained) / GB))
    return rows


if __name__ == "__main__":
    print("| model | base | linear params (B) | expert params (M) | frozen base + embeddings (GB) | experts + grads + moments (GB) | total (GB) |")
    print("|---|---|---|---|---|---|---|")
    for r in table():
        print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.1f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.2f} |")
