#!/usr/bin/env bash
# Mutation testing of the core modules against their fast tests (docs/testing.md).
#
#   tools/mutation.sh                        # every core module (hours on 2 cores)
#   tools/mutation.sh 'freetf.model.mapper*' # one module (mutant-name glob)
#   tools/mutation.sh 'freetf.model.losses*' 'freetf.model.mapper*'
#
# The modules and test files are in [tool.mutmut] of pyproject.toml.  Results are cached
# in mutants/ (git-ignored): a later run only tries mutants without a result, except the
# ones named on the command line, which are always re-run.  `mutmut results` lists the
# survivors, `mutmut show NAME` prints one as a diff.  Set MUTMUT_JOBS to the number of
# parallel workers (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
# mutmut puts mutants/ first on sys.path; a PYTHONPATH pointing at the checkout would
# let the tests import the unmutated package.
unset PYTHONPATH
export RAY_DISABLE_USAGE_STATS=1
mutmut run --max-children "${MUTMUT_JOBS:-2}" "$@"
mutmut export-cicd-stats >/dev/null
cat mutants/mutmut-cicd-stats.json
