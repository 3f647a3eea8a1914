#!/usr/bin/env bash
# Mutation testing of the core modules against their fast tests (docs/testing.md).
#
#   tools/mutation.sh                        # every core module (hours on 2 cores)
#   tools/mutation.sh 'freetf.model.mapper*' # one module (mutant-name glob)
#   tools/mutation.sh 'freetf.model.losses*' 'freetf.model.mapper*'
#   tools/mutation.sh --rerun 'freetf.training.loop*'   # forget cached results first
#
# The modules and test files are in [tool.mutmut] of pyproject.toml.  Results are cached
# in mutants/ (git-ignored): a later run without names tries only the mutants without a
# result, and the mutants of functions whose source changed; a run given globs re-runs every
# mutant they match (to finish a run, name the mutants whose result is still null).  New tests do not re-open a cached result:
# --rerun forgets the results of the named mutants (all of them, survivors included) so
# that they run against the current tests.  `mutmut results` lists the survivors,
# `mutmut show NAME` prints one as a diff.  Set MUTMUT_JOBS to the number of parallel
# workers (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
# mutmut puts mutants/ first on sys.path; a PYTHONPATH pointing at the checkout would
# let the tests import the unmutated package.
unset PYTHONPATH
export RAY_DISABLE_USAGE_STATS=1
if [[ "${1:-}" == "--rerun" ]]; then
    shift
    python - "$@" <<'PY'
import fnmatch, json, pathlib, sys

globs = sys.argv[1:] or ["*"]
for meta in pathlib.Path("mutants").rglob("*.meta"):
    data = json.loads(meta.read_text())
    codes = data.get("exit_code_by_key", {})
    for name in codes:
        if any(fnmatch.fnmatchcase(name, g) for g in globs):
            codes[name] = None
    meta.write_text(json.dumps(data))
PY
fi
mutmut run --max-children "${MUTMUT_JOBS:-2}" "$@"
mutmut export-cicd-stats >/dev/null
cat mutants/mutmut-cicd-stats.json
