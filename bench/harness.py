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
