{# Revenue per day, tenant and currency, for dashboards; cancelled orders left out. #}
select
    order_date,
    tenant_id,
    currency,
    count(*) as orders,
    sum(total_usd) as gross_revenue,
    sum(case when status = 'refunded' then total_usd else 0 end) as refunded_revenue,
    sum(total_usd) - sum(case when status = 'refunded' then total_usd else 0 end) as net_revenue,
    count(distinct user_id) as customers,
    avg(total_usd) as avg_order_value,
    median(total_usd) as median_order_value
from {{ ref('orders') }}
where status <> 'cancelled'
group by order_date, tenant_id, currency
