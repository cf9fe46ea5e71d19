{#
  One row per order: its latest version by updated_at (bronze holds every version haul
  read, one per increment that saw it change), cleaned. Incremental: each run takes the
  bronze rows of the increments it has not seen yet (by _haul_extracted_at) and replaces
  the orders they touch.
#}
{{ config(materialized='incremental', unique_key='id', incremental_strategy='delete+insert') }}

with bronze as (
    select *
    from {{ source('bronze', 'orders') }}
    where id is not null
    {% if is_incremental() %}
      and _haul_extracted_at > (select max(_haul_extracted_at) from {{ this }})
    {% endif %}
),

latest as (
    select *,
           row_number() over (
               partition by id order by updated_at desc, _haul_extracted_at desc
           ) as version
    from bronze
)

select
    id,
    user_id,
    tenant_id,
    lower(trim(status)) as status,
    total_cents,
    total_cents / 100.0 as total_usd,
    upper(trim(currency)) as currency,
    cast(date_trunc('day', created_at) as date) as order_date,
    created_at,
    updated_at,
    json(metadata) as metadata,
    json_extract_string(json(metadata), '$.channel') as channel,
    _haul_job_id,
    _haul_extracted_at
from latest
where version = 1
