"""Stand-in SLURM commands that run submitit's jobs on this machine, for tests of
``hydra/launcher=slurm`` without a cluster.

:func:`install` writes ``sbatch``, ``srun``, ``sacct`` and ``scancel`` into ``<root>/bin``; put that
folder first on ``PATH`` and set ``FAKE_SLURM_DIR=<root>`` (see :func:`slurm_env`). Then

- ``sbatch`` copies the script's ``#SBATCH`` lines to ``<root>/sbatch-<job id>.txt``, prints
  ``Submitted batch job <job id>`` and runs the script in the background once per array task
  (``--array=0-<n-1>%<parallel>``: at most ``parallel`` at once), with the ``SLURM_*`` variables
  a batch job sees; the script's own output goes to ``<root>/job-<id>[_<task>].out``;
- ``srun`` drops its options and starts ``nodes x ntasks-per-node`` copies of its command, each
  with its ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NODEID``, writing to its ``--output`` and
  ``--error`` patterns (``%A %a %j %t`` expanded);
- ``sacct -o JobID,State,NodeList --parsable2 -j <id>`` reports each job's or array task's state
  (PENDING, RUNNING, then COMPLETED or FAILED by the script's exit code);
- ``scancel`` appends its arguments to ``<root>/scancel.txt``.

Only what submitit 1.5 calls is covered (``submitit/slurm/slurm.py``): no requeue (``scontrol``),
and every "node" is this machine.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

SBATCH = r"""#!/usr/bin/env bash
# Stand-in sbatch <script>: record the #SBATCH lines, run the script in the background.
set -euo pipefail
script=$1
dir=${FAKE_SLURM_DIR:?}
option() { sed -n "s/^#SBATCH --$1=//p" "$script" | tail -n 1; }
array=$(option array)                 # 0-<last>%<parallel>, empty for a single job
nodes=$(option nodes); nodes=${nodes:-1}
per_node=$(option ntasks-per-node); per_node=${per_node:-1}
name=$(option job-name); name=${name:-sbatch}
id=$(( $(cat "$dir/last_job_id") + 1 ))
if [[ -n $array ]]; then
  range=${array%%%*}; last=${range#*-}; parallel=${array#*%}
  tasks=$(seq 0 "$last")
else
  last=0; parallel=1; tasks=single
fi
echo $(( id + last )) > "$dir/last_job_id"   # array task i runs as job id+i, as SLURM numbers them
grep '^#SBATCH' "$script" > "$dir/sbatch-$id.txt"

run_task() {                          # $1: array task index, or "single"
  local key=$id job_id=$id
  if [[ $1 != single ]]; then
    key=${id}_$1; job_id=$(( id + $1 ))
    export SLURM_ARRAY_JOB_ID=$id SLURM_ARRAY_TASK_ID=$1 SLURM_ARRAY_TASK_COUNT=$(( last + 1 ))
  fi
  export SLURM_JOB_ID=$job_id SLURM_JOBID=$job_id SLURM_JOB_NAME=$name SLURM_SUBMIT_DIR=$PWD
  export SLURM_NNODES=$nodes SLURM_JOB_NUM_NODES=$nodes SLURM_NTASKS_PER_NODE=$per_node
  export SLURM_NTASKS=$(( nodes * per_node )) SLURM_NODEID=0
  export SLURM_JOB_NODELIST=localhost SLURM_NODELIST=localhost
  echo RUNNING > "$dir/state-$key"
  if bash "$script" > "$dir/job-$key.out" 2>&1; then state=COMPLETED; else state=FAILED; fi
  echo $state > "$dir/state-$key"
}

for task in $tasks; do
  if [[ $task == single ]]; then echo PENDING > "$dir/state-$id"; else echo PENDING > "$dir/state-${id}_$task"; fi
done
(
  n=0
  for task in $tasks; do
    run_task "$task" &
    n=$(( n + 1 ))
    if (( n % parallel == 0 )); then wait; fi
  done
  wait
) < /dev/null > /dev/null 2>&1 &
echo "Submitted batch job $id"
"""

SRUN = r"""#!/usr/bin/env bash
# Stand-in srun [options] <command>: one copy of <command> per task of the stand-in job.
set -uo pipefail
out=/dev/stdout; err=/dev/stderr
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in
    --output) out=$2; shift 2 ;;
    --error) err=$2; shift 2 ;;
    --*=* | --unbuffered) shift ;;
    *) echo "stand-in srun: unexpected option $1" >&2; exit 2 ;;
  esac
done
expand() {                            # $1: log path pattern, $2: task rank
  local p=$1
  p=${p//"%A"/${SLURM_ARRAY_JOB_ID:-}}; p=${p//"%a"/${SLURM_ARRAY_TASK_ID:-}}
  p=${p//"%j"/$SLURM_JOB_ID}; p=${p//"%t"/$2}
  mkdir -p "$(dirname "$p")"
  echo "$p"
}
pids=()
for (( t = 0; t < SLURM_NTASKS; t++ )); do
  SLURM_PROCID=$t SLURM_LOCALID=$(( t % SLURM_NTASKS_PER_NODE )) \
    SLURM_NODEID=$(( t / SLURM_NTASKS_PER_NODE )) "$@" >> "$(expand "$out" $t)" 2>> "$(expand "$err" $t)" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
exit $rc
"""

SACCT = r"""#!/usr/bin/env bash
# Stand-in sacct -o JobID,State,NodeList --parsable2 -j <id> [-j <id> ...]: states of the stand-in jobs.
set -uo pipefail
dir=${FAKE_SLURM_DIR:?}
ids=()
while [[ $# -gt 0 ]]; do
  case $1 in
    -o) [[ $2 == JobID,State,NodeList ]] || { echo "stand-in sacct: unexpected -o $2" >&2; exit 2; }; shift 2 ;;
    -j) ids+=("$2"); shift 2 ;;
    *) shift ;;
  esac
done
echo "JobID|State|NodeList"
for id in "${ids[@]}"; do
  for file in "$dir/state-$id" "$dir/state-${id}"_*; do
    [[ -f $file ]] && echo "${file##*/state-}|$(cat "$file")|localhost"
  done
done
exit 0
"""

SCANCEL = r"""#!/usr/bin/env bash
# Stand-in scancel: record the request.
echo "$*" >> "${FAKE_SLURM_DIR:?}/scancel.txt"
"""


def install(root: Path) -> Path:
    """Write the stand-in commands into ``<root>/bin`` and return ``root``.

    Job ids start at a random 5-digit number: Lightning derives a job's DDP port from the last
    four digits of ``SLURM_JOB_ID``, so concurrent test runs rarely share one.
    """
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("sbatch", SBATCH), ("srun", SRUN), ("sacct", SACCT), ("scancel", SCANCEL)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
    (root / "last_job_id").write_text(str(random.randrange(10_000, 90_000)))
    return root


def slurm_env(root: Path) -> dict[str, str]:
    """This process's environment, minus any real ``SLURM_*`` variables, with the stand-ins of
    ``root`` first on ``PATH`` and one intra-op thread per process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        PATH=f"{root / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        FAKE_SLURM_DIR=str(root),
        OMP_NUM_THREADS="1",
    )
    return env


def submit(root: Path, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Runs ``python <argv>`` (a Hydra multirun on ``hydra/launcher=slurm``) against the
    stand-ins of ``root``; fails with the command's and the jobs' output unless it succeeded."""
    proc = subprocess.run(
        [sys.executable, *argv],
        cwd=cwd,
        env=slurm_env(root),
        capture_output=True,
        text=True,
        timeout=300,
    )
    jobs = "\n".join(p.read_text()[-2000:] for p in sorted(root.glob("job-*.out")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + jobs
    return proc


def sbatch_options(root: Path) -> list[dict[str, str]]:
    """The ``#SBATCH --key=value`` options of each submitted script, in job id order
    (``--flag`` without a value maps to ``""``)."""
    scripts = sorted(root.glob("sbatch-*.txt"), key=lambda p: int(p.stem.split("-")[1]))
    options = []
    for script in scripts:
        lines = [line.removeprefix("#SBATCH --") for line in script.read_text().splitlines()]
        options.append(dict((line.split("=", 1) + [""])[:2] for line in lines))
    return options
