"""Text-only stand-ins for the small models llama.cpp's own server tests download.

llama.cpp's server tests (`make conformance`) start llama-server on a tiny story model, a BERT
embedding model and a BERT reranker fetched from the Hugging Face hub. None can be downloaded
here, so these random-weight models of the same architectures take their place:

* ``llama.gguf``: a llama-architecture decoder with a sentencepiece vocabulary (byte fallback,
  whole-word pieces) and the fill-in-the-middle tokens `/infill` needs. Only whole words get
  output weights, so sampling never ends early on EOS or stops inside a UTF-8 sequence.
* ``bert.gguf``: a BERT encoder with a WordPiece vocabulary, CLS pooling (`--embedding`).
* ``rerank.gguf``: the same with a classification head and rank pooling (`--reranking`).

Their answers are nonsense; what the tests check beyond the text (shapes, counts, status codes,
headers, streaming, errors) holds. Usage::

    python -m vision_cache.synthetic.stand_ins OUT_DIR
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt

from vision_cache.synthetic.vocab import SPM_SPACE, prefix_closure, words

F32 = npt.NDArray[np.float32]
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6  # gguf token types
LLAMA_SPECIALS = (
    "<unk>",
    "<s>",
    "</s>",
    "<fim_prefix>",
    "<fim_suffix>",
    "<fim_middle>",
    "<fim_pad>",
    "<fim_rep>",
    "<fim_sep>",
)
FIM_KEYS = {
    "<fim_prefix>": gguf.Keys.Tokenizer.FIM_PRE_ID,
    "<fim_suffix>": gguf.Keys.Tokenizer.FIM_SUF_ID,
    "<fim_middle>": gguf.Keys.Tokenizer.FIM_MID_ID,
    "<fim_pad>": gguf.Keys.Tokenizer.FIM_PAD_ID,
    "<fim_rep>": gguf.Keys.Tokenizer.FIM_REP_ID,
    "<fim_sep>": gguf.Keys.Tokenizer.FIM_SEP_ID,
}
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
N_EMBD, N_LAYER, N_HEAD, N_FF = 64, 2, 4, 128


def _rand(name: str, shape: tuple[int, ...], std: float) -> F32:
    # one stream per tensor name: the same file on every run
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return (rng.standard_normal(shape) * std).astype(np.float32)


def _ones(n: int) -> F32:
    return np.ones(n, np.float32)


def _zeros(n: int) -> F32:
    return np.zeros(n, np.float32)


def llama_tokens() -> tuple[list[str], list[int], list[float]]:
    """Tokens, types and scores of the sentencepiece vocabulary."""
    chars = [SPM_SPACE] + [chr(c) for c in range(0x21, 0x7F)]
    spaced = prefix_closure((SPM_SPACE + w for w in words()), 2)
    tokens = [*LLAMA_SPECIALS, *(f"<0x{b:02X}>" for b in range(256)), *chars, *spaced]
    types = [CONTROL] * len(LLAMA_SPECIALS) + [BYTE] * 256 + [NORMAL] * (len(chars) + len(spaced))
    types[0] = UNKNOWN
    first = len(LLAMA_SPECIALS) + 256
    # earlier (shorter) pieces score higher: merges build words left to right
    scores = [0.0] * first + [-float(i) for i in range(len(tokens) - first)]
    return tokens, types, scores


def write_llama(path: Path, n_ctx: int = 8192) -> None:
    tokens, types, scores = llama_tokens()
    ids = {t: i for i, t in enumerate(tokens)}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("vcache stand-in llama")
    _shape_kv(w, n_ctx)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(ids["<s>"])
    w.add_eos_token_id(ids["</s>"])
    w.add_unk_token_id(ids["<unk>"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    for token, key in FIM_KEYS.items():
        w.add_uint32(key, ids[token])
    whole_words = np.array([t.startswith(SPM_SPACE) and len(t) > 2 for t in tokens])
    out = _rand("output", (len(tokens), N_EMBD), 1.0)
    out[~whole_words] = 0.0
    w.add_tensor("token_embd.weight", _rand("token_embd", (len(tokens), N_EMBD), 1.0))
    w.add_tensor("output_norm.weight", _ones(N_EMBD))
    w.add_tensor("output.weight", out)
    for i in range(N_LAYER):
        _llama_block(w, f"blk.{i}.")
    _finish(w)


def _llama_block(w: gguf.GGUFWriter, p: str) -> None:
    s = 1.0 / np.sqrt(N_EMBD)
    w.add_tensor(p + "attn_norm.weight", _ones(N_EMBD))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add_tensor(f"{p}{name}.weight", _rand(p + name, (N_EMBD, N_EMBD), s))
    w.add_tensor(p + "ffn_norm.weight", _ones(N_EMBD))
    w.add_tensor(p + "ffn_gate.weight", _rand(p + "ffn_gate", (N_FF, N_EMBD), s))
    w.add_tensor(p + "ffn_up.weight", _rand(p + "ffn_up", (N_FF, N_EMBD), s))
    w.add_tensor(p + "ffn_down.weight", _rand(p + "ffn_down", (N_EMBD, N_FF), 1 / np.sqrt(N_FF)))


def wordpiece_tokens() -> list[str]:
    """WordPiece as llama.cpp stores it: word starts carry ▁, continuations carry nothing."""
    tokens = [*BERT_SPECIALS]
    chars = [chr(c) for c in range(0x21, 0x7F)]
    tokens += chars + [SPM_SPACE + c for c in chars]
    seen = set(tokens)
    for word in words():
        for end in range(2, len(word) + 1):
            for piece in (SPM_SPACE + word[:end], word[:end]):
                if piece not in seen:
                    seen.add(piece)
                    tokens.append(piece)
    return tokens


def write_bert(path: Path, *, rerank: bool, n_ctx: int = 1024) -> None:
    tokens = wordpiece_tokens()
    ids = {t: i for i, t in enumerate(tokens)}
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_name("vcache stand-in " + ("reranker" if rerank else "embedding"))
    _shape_kv(w, n_ctx)
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.RANK if rerank else gguf.PoolingType.CLS)
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([CONTROL] * len(BERT_SPECIALS) + [NORMAL] * (len(tokens) - 5))
    w.add_token_type_count(2)
    w.add_bos_token_id(ids["[CLS]"])
    w.add_sep_token_id(ids["[SEP]"])
    w.add_eos_token_id(ids["[SEP]"])
    w.add_unk_token_id(ids["[UNK]"])
    w.add_pad_token_id(ids["[PAD]"])
    w.add_mask_token_id(ids["[MASK]"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(True)
    w.add_tensor("token_embd.weight", _rand("bert.token_embd", (len(tokens), N_EMBD), 1.0))
    w.add_tensor("token_types.weight", _rand("bert.token_types", (2, N_EMBD), 0.1))
    w.add_tensor("position_embd.weight", _rand("bert.position_embd", (n_ctx, N_EMBD), 0.1))
    _layer_norm(w, "token_embd_norm", N_EMBD)
    for i in range(N_LAYER):
        _bert_block(w, f"blk.{i}.")
    if rerank:
        s = 1.0 / np.sqrt(N_EMBD)
        w.add_tensor("cls.weight", _rand("cls", (N_EMBD, N_EMBD), s))
        w.add_tensor("cls.bias", _zeros(N_EMBD))
        w.add_tensor("cls.output.weight", _rand("cls.output", (1, N_EMBD), s))
        w.add_tensor("cls.output.bias", _zeros(1))
    _finish(w)


def _bert_block(w: gguf.GGUFWriter, p: str) -> None:
    s = 1.0 / np.sqrt(N_EMBD)
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add_tensor(f"{p}{name}.weight", _rand(p + name, (N_EMBD, N_EMBD), s))
        w.add_tensor(f"{p}{name}.bias", _zeros(N_EMBD))
    _layer_norm(w, p + "attn_output_norm", N_EMBD)
    w.add_tensor(p + "ffn_up.weight", _rand(p + "ffn_up", (N_FF, N_EMBD), s))
    w.add_tensor(p + "ffn_up.bias", _zeros(N_FF))
    w.add_tensor(p + "ffn_down.weight", _rand(p + "ffn_down", (N_EMBD, N_FF), 1 / np.sqrt(N_FF)))
    w.add_tensor(p + "ffn_down.bias", _zeros(N_EMBD))
    _layer_norm(w, p + "layer_output_norm", N_EMBD)


def _shape_kv(w: gguf.GGUFWriter, n_ctx: int) -> None:
    w.add_context_length(n_ctx)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)


def _layer_norm(w: gguf.GGUFWriter, name: str, n: int) -> None:
    w.add_tensor(name + ".weight", _ones(n))
    w.add_tensor(name + ".bias", _zeros(n))


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_all(out: Path) -> dict[str, Path]:
    """Every stand-in under `out`, each written only if missing (they are deterministic)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"llama": out / "llama.gguf", "bert": out / "bert.gguf", "rerank": out / "rerank.gguf"}
    writers = {
        "llama": lambda p: write_llama(p),
        "bert": lambda p: write_bert(p, rerank=False),
        "rerank": lambda p: write_bert(p, rerank=True),
    }
    for name, path in files.items():
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            writers[name](tmp)
            tmp.replace(path)
    return files


if __name__ == "__main__":
    for path in write_all(Path(sys.argv[1])).values():
        print(path)
