"""The medallion pipeline as Dagster assets: haul's bronze copy of public.orders, and
silver and gold built on it by dbt. Each asset runs one step of ../pipeline.sh in a
subprocess; bronze reports haul's job, rows and bytes as asset metadata (from
`haul run --json`, or `haul submit --wait --json` with HAUL_COORDINATOR set).

    HAUL_SOURCE=... HAUL_LAKE=... WAREHOUSE=... \\
        dagster asset materialize -f dagster_assets.py --select '*'
"""

import json
import re
import subprocess
from pathlib import Path

from dagster import (
    AssetExecutionContext,
    Backoff,
    Definitions,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
    asset,
)

PIPELINE = Path(__file__).resolve().parent.parent / "pipeline.sh"


def step(name: str) -> str:
    done = subprocess.run([str(PIPELINE), name], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} exited {done.returncode}: {done.stderr[-4000:]}")
    return done.stdout


@asset(
    group_name="medallion",
    retry_policy=RetryPolicy(max_retries=3, delay=10, backoff=Backoff.EXPONENTIAL),
    description="public.orders, copied by haul (one increment per run) into Parquet",
)
def bronze_orders(context: AssetExecutionContext) -> MaterializeResult:
    s = json.loads(step("extract"))
    context.log.info(f"haul job {s['job_id']}: {s['rows']} rows")
    return MaterializeResult(
        metadata={
            "haul_job_id": s["job_id"],
            "rows": MetadataValue.int(s["rows"]),
            "bytes": MetadataValue.int(s["bytes"]),
            "manifest": MetadataValue.path(s["manifest"]),
        }
    )


@asset(
    group_name="medallion",
    deps=[bronze_orders],
    retry_policy=RetryPolicy(max_retries=1, delay=60),
    description="silver.orders and gold.daily_revenue, built and tested by dbt",
)
def silver_and_gold(context: AssetExecutionContext) -> MaterializeResult:
    out = step("transform")
    m = re.findall(r"Done\. PASS=(\d+) WARN=(\d+) ERROR=(\d+)", out)
    passed, warned, _ = (int(x) for x in m[-1]) if m else (0, 0, 0)
    return MaterializeResult(
        metadata={"dbt_passed": MetadataValue.int(passed), "dbt_warned": MetadataValue.int(warned)}
    )


defs = Definitions(assets=[bronze_orders, silver_and_gold])
