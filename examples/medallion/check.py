"""Checks silver and gold against the source itself, computed independently:

- silver.orders holds exactly the source's orders, cleaned: the same count and the same
  order-independent checksum over (id, status, total_cents, currency, updated_at);
- gold.daily_revenue equals the same aggregation computed by Postgres on the source.

    python check.py <warehouse.duckdb> <source connection string>

Exit 1 naming the difference. Needs duckdb (the dbt venv has it) and psql.
"""

import csv
import hashlib
import io
import math
import subprocess
import sys

import duckdb


def psql(dsn: str, sql: str) -> list[list[str]]:
    out = subprocess.run(
        ["psql", "-X", "-q", dsn, "-c", f"COPY ({sql}) TO STDOUT WITH (FORMAT csv)"],
        check=True, capture_output=True, text=True,
    ).stdout
    return list(csv.reader(io.StringIO(out)))


def digest(rows) -> tuple[int, int]:
    total = 0
    n = 0
    for r in rows:
        h = hashlib.md5("|".join(str(v) for v in r).encode()).digest()
        total = (total + int.from_bytes(h[:8], "little")) % (1 << 64)
        n += 1
    return n, total


def main() -> int:
    warehouse, dsn = sys.argv[1], sys.argv[2]
    wh = duckdb.connect(warehouse, read_only=True)
    wh.execute("SET TimeZone = 'UTC'")

    src = psql(dsn, """
        SELECT id, lower(trim(status)), total_cents, upper(trim(currency)),
               (extract(epoch FROM updated_at) * 1000000)::int8
          FROM public.orders WHERE id IS NOT NULL""")
    silver = wh.execute("""
        SELECT id::varchar, status, total_cents, currency, epoch_us(updated_at)
          FROM silver.orders""").fetchall()
    want, got = digest(src), digest(silver)
    if want != got:
        print(f"silver.orders: {got[0]} rows (checksum {got[1]}), "
              f"the source has {want[0]} (checksum {want[1]})")
        return 1

    key = "order_date, tenant_id, currency"
    src_gold = psql(dsn, f"""
        SELECT (created_at AT TIME ZONE 'UTC')::date AS order_date, tenant_id,
               upper(trim(currency)) AS currency,
               count(*), sum(total_cents / 100.0),
               sum(CASE WHEN lower(trim(status)) = 'refunded' THEN total_cents / 100.0 ELSE 0 END),
               sum(total_cents / 100.0)
                 - sum(CASE WHEN lower(trim(status)) = 'refunded' THEN total_cents / 100.0 ELSE 0 END),
               count(DISTINCT user_id), avg(total_cents / 100.0),
               percentile_cont(0.5) WITHIN GROUP (ORDER BY total_cents / 100.0)
          FROM public.orders
         WHERE id IS NOT NULL AND lower(trim(status)) <> 'cancelled'
         GROUP BY 1, 2, 3 ORDER BY 1, 2, 3""")
    gold = wh.execute(f"""
        SELECT order_date::varchar, tenant_id, currency, orders, gross_revenue,
               refunded_revenue, net_revenue, customers, avg_order_value, median_order_value
          FROM gold.daily_revenue ORDER BY {key}""").fetchall()
    if len(src_gold) != len(gold):
        print(f"gold.daily_revenue: {len(gold)} rows, the source's aggregation {len(src_gold)}")
        return 1
    names = ["orders", "gross_revenue", "refunded_revenue", "net_revenue", "customers",
             "avg_order_value", "median_order_value"]
    for s, g in zip(src_gold, gold):
        if (s[0], int(s[1]), s[2]) != (g[0], g[1], g[2]):
            print(f"gold.daily_revenue: group {g[:3]} where the source has {s[:3]}")
            return 1
        for name, a, b in zip(names, s[3:], g[3:]):
            if not math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-6):
                print(f"gold.daily_revenue {g[:3]}: {name} = {b}, the source says {a}")
                return 1
    print(f"check: silver.orders = the source's {want[0]} orders (checksum {want[1]}); "
          f"gold.daily_revenue = the source's aggregation ({len(gold)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
