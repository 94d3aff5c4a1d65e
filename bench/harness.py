"""The set-up that the benchmarks and the scripts (scripts/*.py) share: the offline environment, SST-2 and the
reproduction's split of it, the machine's CPU, and the embedded service as a child process.

The scripts import it as `bench.harness` (they put the repository on sys.path). Importing it sets no thread
policy, unlike bench/common.py, which makes every benchmark wait passively for OpenMP threads: each script keeps
the policy it chooses.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

# Nothing is downloaded and nothing chatters; set before transformers or tokenizers are imported.
OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
}
for _variable, _value in OFFLINE_ENVIRONMENT.items():
    os.environ.setdefault(_variable, _value)

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO / "data" / "sst2"  # all 60,614 training rows ship with the repository (data/sst2/README.md)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform says ("" when it says nothing)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def sst2_reproduction_split(n_train: int, n_reference: int, seed: int = 0):
    """The reproduction's rows as influence Examples: (train, validation, reference, held_out).

    train: `n_train` stratified SST-2 training rows; validation: the whole validation split; reference: its
    `n_reference` stratified rows; held_out: the other validation rows. Subsets keep the files' order."""
    # Here, not at the top: influence loads torch, and bench/common.py imports this module before it sets the
    # thread policy that torch reads as it loads.
    from influence import read_labelled_tsv, stratified_subsample

    train = stratified_subsample(read_labelled_tsv(SST2 / "train.tsv"), n_train, seed=seed)
    validation = read_labelled_tsv(SST2 / "validation.tsv")
    reference = stratified_subsample(validation, n_reference, seed=seed)
    chosen = {id(e) for e in reference}
    held_out = [e for e in validation if id(e) not in chosen]
    return train, validation, reference, held_out


def tsv_text(columns: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    """A header line and one tab-separated line per row, each ending in a newline."""
    lines = ["\t".join(columns)] + ["\t".join(str(value) for value in row) for row in rows]
    return "\n".join(lines) + "\n"


def free_port(preferred: int | None = None) -> int:
    """`preferred` when nothing listens on it on 127.0.0.1, else a port that is free at the moment of asking."""
    if preferred is not None:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", preferred)) != 0:
                return preferred
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_service(
    port: int,
    *,
    data_dir: Path,
    allowed_roots: Iterable[Path],
    log_path: Path,
    env: Mapping[str, str | None] | None = None,
) -> subprocess.Popen:
    """`python -m app.embedded serve` on 127.0.0.1:`port` (the API and a worker child) in its own process group,
    its output appended to `log_path`. Its environment: this process's, the data folder and allowed roots, then
    `env`, where None removes a variable."""
    service_env = {
        **os.environ,
        "INFLUENCE_DATA_DIR": str(data_dir),
        "INFLUENCE_ALLOWED_ROOTS": json.dumps([str(root) for root in allowed_roots]),
        **(env or {}),
    }
    with open(log_path, "ab") as log:  # the child keeps its own descriptor of the log
        return subprocess.Popen(
            [sys.executable, "-m", "app.embedded", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env={name: value for name, value in service_env.items() if value is not None},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_service(process: subprocess.Popen) -> None:
    """SIGINT (uvicorn stops, then the runner stops its worker), and SIGKILL to the process group if the service
    has not stopped 60 s later."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# --- causal LMs in real shapes, from configs with random weights (bench/llm.py, tests/app/test_llm_end_to_end.py)

# The synthetic tokenizer's special tokens, in id order: pad 0, unk 1, bos 2, eos 3; then the 256 byte-level
# symbols, then the words.
SYNTHETIC_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
FIRST_WORD_ID = len(SYNTHETIC_SPECIALS) + 256


def synthetic_word(token_id: int) -> str:
    """The synthetic tokenizer's word for `token_id` (FIRST_WORD_ID and up), one token when a space precedes it:
    the words are the letter strings in order of length, then alphabetically (a .. z, aa .. zz, aaa ...)."""
    index = token_id - FIRST_WORD_ID
    if index < 0:
        raise ValueError(f"token {token_id} is not a word (words start at {FIRST_WORD_ID})")
    length = 1
    while index >= len(_LETTERS) ** length:
        index -= len(_LETTERS) ** length
        length += 1
    letters = []
    for _ in range(length):
        index, digit = divmod(index, len(_LETTERS))
        letters.append(_LETTERS[digit])
    return "".join(reversed(letters))


def synthetic_text(word_ids: Iterable[int]) -> str:
    """Text whose words are these token ids (each >= FIRST_WORD_ID): it tokenizes to exactly them."""
    return " ".join(synthetic_word(int(i)) for i in word_ids)


def save_synthetic_tokenizer(folder: Path, vocab_size: int):
    """A byte-level BPE tokenizer with exactly `vocab_size` ids, saved in `folder` (and returned): the four
    specials, the 256 byte symbols, then words (synthetic_word) whose every prefix is a token too, each built by
    one merge from its prefix. Text is split GPT-2 style with a space added in front, so each word of a text is
    one token and any other text still encodes (byte by byte). Byte-level BPE because transformers loads a
    Qwen2 folder's tokenizer as its own Qwen2Tokenizer whatever tokenizer_config.json names, rebuilding it from
    the vocabulary and merges with a byte-level pre-tokenizer; a word-level vocabulary would encode to nothing
    there. Rows then tokenize to the lengths they are written with, over the model's whole vocabulary."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= FIRST_WORD_ID:
        raise ValueError(f"a vocabulary of {vocab_size} has no room for words (at least {FIRST_WORD_ID + 1})")
    vocab = {token: i for i, token in enumerate(SYNTHETIC_SPECIALS)}
    vocab.update((symbol, len(SYNTHETIC_SPECIALS) + i) for i, symbol in enumerate(sorted(ByteLevel.alphabet())))
    space = "\u0120"  # the byte-level symbol of " "
    merges = []
    for token_id in range(FIRST_WORD_ID, vocab_size):
        word = space + synthetic_word(token_id)
        vocab[word] = token_id
        merges.append((word[:-1], word[-1]))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", 2)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(folder)
    # Read by Qwen2Tokenizer, which builds its own pre-tokenizer: the same leading space as above.
    config_path = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config_path.write_text(json.dumps({**config, "add_prefix_space": True}, indent=2), encoding="utf-8")
    return fast


def save_random_causal_lm(
    config,
    folder: Path,
    adapter_folder: Path | None = None,
    *,
    lora_rank: int = 8,
    lora_targets: Iterable[str] = ("q_proj", "v_proj"),
    seed: int = 0,
) -> None:
    """A causal LM built from `config` (a transformers config) with seeded random weights, saved as safetensors
    with the synthetic tokenizer of its vocabulary size into `folder`; with `adapter_folder`, a PEFT LoRA adapter
    (rank `lora_rank`, alpha 2 x rank, on `lora_targets`) saved there as adapter_model.safetensors. LoRA B starts
    random, not zero (init_lora_weights=False), so that every LoRA unit has a gradient. Nothing is downloaded."""
    import torch
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 2, 3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(folder, safe_serialization=True)
        save_synthetic_tokenizer(folder, config.vocab_size)
        if adapter_folder is None:
            return
        from peft import LoraConfig, get_peft_model  # only an adapter needs peft

        torch.manual_seed(seed + 1)
        lora = LoraConfig(
            r=lora_rank,
            lora_alpha=2 * lora_rank,
            lora_dropout=0.0,
            target_modules=list(lora_targets),
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        get_peft_model(model, lora).save_pretrained(adapter_folder, safe_serialization=True)
