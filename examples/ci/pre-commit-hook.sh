#!/usr/bin/env bash
# A pre-commit hook: `influence check` on every staged data file under INFLUENCE_CHECK_FOLDER; the commit stops
# when a batch carries suspicious rows or cannot be checked. Settings and installation: examples/ci/README.md.
set -o pipefail

folder=${INFLUENCE_CHECK_FOLDER:-data/incoming}
: "${INFLUENCE_CHECK_INDEX:?set INFLUENCE_CHECK_INDEX to the id of the index to check against}"
: "${INFLUENCE_CHECK_REFERENCE_DATASET:?set INFLUENCE_CHECK_REFERENCE_DATASET to the reference dataset id}"

# The pre-commit framework names the files; as a plain .git/hooks/pre-commit the staged ones are found here.
files=("$@")
if (( $# == 0 )); then
  while IFS= read -r -d '' file; do files+=("$file"); done < <(
    git diff --cached --name-only -z --diff-filter=ACMR -- \
      "$folder/*.csv" "$folder/*.tsv" "$folder/*.jsonl" "$folder/*.parquet"
  )
fi

# What is checked is what the commit records: the staged content, not the working tree's.
scratch=$(mktemp -d) || exit 2
trap 'rm -rf "$scratch"' EXIT
status=0
for i in "${!files[@]}"; do
  file=${files[$i]}
  staged="$scratch/$i/$(basename "$file")"  # the file's own name: the service reads its format from it
  mkdir -p "$scratch/$i" && git cat-file blob ":$file" > "$staged" || { status=2; continue; }
  echo "influence check: $file" >&2
  code=0
  influence check create "$INFLUENCE_CHECK_INDEX" "$staged" \
    --reference-dataset "$INFLUENCE_CHECK_REFERENCE_DATASET" \
    --text-column "${INFLUENCE_CHECK_TEXT_COLUMN:-text}" --label-column "${INFLUENCE_CHECK_LABEL_COLUMN:-label}" \
    ${INFLUENCE_CHECK_THRESHOLD_PERCENTILE:+--threshold-percentile "$INFLUENCE_CHECK_THRESHOLD_PERCENTILE"} \
    ${INFLUENCE_CHECK_MAX_FLAGGED:+--max-flagged "$INFLUENCE_CHECK_MAX_FLAGGED"} || code=$?
  case $code in
    0) ;;
    1) echo "influence check: $file carries suspicious rows (verdict fail)" >&2 ;;
    *) echo "influence check: could not check $file (exit $code)" >&2 ;;
  esac
  if (( code > status )); then status=$code; fi
done
if (( status != 0 )); then
  echo "commit stopped by the influence check (git commit --no-verify skips it)" >&2
fi
exit "$status"
