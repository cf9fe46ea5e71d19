"""The nightly medallion pipeline as an Airflow 3 DAG: haul copies the source's changes
into bronze, then dbt builds and tests silver and gold. Each task runs one step of
../pipeline.sh (its exit code is the task's); failed tasks are retried with growing
delays. The settings (HAUL_SOURCE, HAUL_LAKE, WAREHOUSE, HAUL, DBT) come from the
worker's environment. The bronze task pushes haul's JSON summary (its last line) to XCom.

    airflow dags test medallion_nightly
"""

from datetime import datetime, timedelta
from pathlib import Path

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG

PIPELINE = Path(__file__).resolve().parent.parent / "pipeline.sh"

with DAG(
    dag_id="medallion_nightly",
    schedule="0 2 * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    default_args={
        "retries": 3,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
    },
    tags=["haul", "medallion"],
) as dag:
    # a trailing space: a command ending in .sh would be read as a template file
    bronze = BashOperator(task_id="haul_bronze", bash_command=f"{PIPELINE} extract ")
    silver_gold = BashOperator(task_id="dbt_build", bash_command=f"{PIPELINE} transform ")
    bronze >> silver_gold
