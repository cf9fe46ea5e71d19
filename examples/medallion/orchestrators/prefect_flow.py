"""The nightly medallion pipeline as a Prefect 3 flow: haul copies the source's changes
into bronze, then dbt builds and tests silver and gold. Each task is one step of
../pipeline.sh; a failed step (a non-zero exit) is retried with growing delays, as a
nightly job that meets a source failover or a busy warehouse should be.

    HAUL_SOURCE=... HAUL_LAKE=... WAREHOUSE=... python prefect_flow.py

(HAUL and DBT name the binaries when they are not on PATH.) Prints the bronze job's
summary as JSON.
"""

import json
import subprocess
from pathlib import Path

from prefect import flow, get_run_logger, task

PIPELINE = Path(__file__).resolve().parent.parent / "pipeline.sh"


def step(name: str) -> str:
    """Runs one step of the pipeline; its stdout, or an error with its stderr's end."""
    done = subprocess.run([str(PIPELINE), name], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} exited {done.returncode}: {done.stderr[-4000:]}")
    return done.stdout


@task(retries=3, retry_delay_seconds=[10, 60, 300])
def extract_bronze() -> dict:
    summary = json.loads(step("extract"))
    get_run_logger().info("bronze: haul job %s, %s rows", summary["job_id"], summary["rows"])
    return summary


@task(retries=1, retry_delay_seconds=60)
def build_silver_and_gold(bronze: dict) -> None:
    out = step("transform")
    done = [line for line in out.splitlines() if "Done. PASS=" in line]
    get_run_logger().info("dbt after bronze job %s: %s", bronze["job_id"], done[-1:] or out[-500:])


@flow(name="medallion-nightly")
def nightly() -> dict:
    bronze = extract_bronze()
    build_silver_and_gold(bronze)
    return bronze


if __name__ == "__main__":
    print(json.dumps(nightly()))
