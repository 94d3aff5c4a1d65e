"""`influence`: the service's HTTP API from a shell, for people (aligned tables) and scripts (`--json`).

    influence models register /models/minilm --name minilm --num-labels 2
    influence datasets upload train.tsv --text-column sentence
    influence indexes create --model M --dataset D --layers middle        # waits, with a progress bar
    influence query INDEX --text "a gorgeous , witty movie" --label 1 --top-k 5
    influence audit INDEX --reference-dataset D --output audit.csv        # = `audit create`
    influence check INDEX new.csv --text-column sentence --label-column label --reference-dataset D
    influence check INDEX new.csv ... --target-precision 0.9               # a threshold calibrated on the index
    influence index settings INDEX --pin REPORT                           # what unnamed settings come from
    influence audit download AUDIT rows.jsonl

The service is `--url` (or INFLUENCE_URL, default http://127.0.0.1:8000); the key `--api-key`, `--api-key-file`
(the embedded service writes <data_dir>/local-api-key) or INFLUENCE_API_KEY / INFLUENCE_API_KEY_FILE.
Job-creating commands wait for their job (progress on stderr when it is a terminal) unless `--no-wait`; each
workflow (audit, report, check, experiment) also has `wait`, `cancel` and, where it makes a file, `download`.

A query, audit or check sends only the scoring options given: the others are the index's settings (its layer
report's recommendation, pinned or the latest, else the defaults), and the output says where they came from.

Exit status: 0 success; 1 a check whose verdict is fail; 2 a usage error, an error answer of the service (its
problem detail goes to stderr, each invalid field named), a failed or cancelled job, or a service that cannot be
reached; 3 a service of another major version than this client's (both named on stderr; another minor
version is a one-line warning on stderr); 130 when interrupted while waiting (the job goes on). `--json` prints
exactly one JSON document on stdout.

The package: `main` (the parser, the run of a command), `output` and `context` (what every command shares),
`resources` (show / list / delete of any resource) and `workflows` (every workflow's commands), and a module per
command group that holds its table and what is its own.
"""

from influence_client.cli.main import build_parser, main, with_default_actions
from influence_client.cli.output import render_table

__all__ = ["build_parser", "main", "render_table", "with_default_actions"]
