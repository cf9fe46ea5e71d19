-- The source: an `orders` table as an application keeps it. `updated_at` is set by a
-- trigger on every insert and update (to the transaction's start, which is what makes it
-- a safe watermark for `haul run --incremental updated_at`). Run with psql
-- `-v rows=300000`; the values are derived from the row number, so a run is repeatable.
CREATE TABLE public.orders (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id     bigint NOT NULL,
    tenant_id   integer NOT NULL,
    status      text NOT NULL,           -- messy: case and whitespace vary
    total_cents bigint NOT NULL,
    currency    text NOT NULL,           -- messy: case varies
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    metadata    jsonb
);
CREATE INDEX orders_updated_at ON public.orders (updated_at);

CREATE FUNCTION public.orders_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;
CREATE TRIGGER orders_touch BEFORE INSERT OR UPDATE ON public.orders
    FOR EACH ROW EXECUTE FUNCTION public.orders_touch();

INSERT INTO public.orders (id, user_id, tenant_id, status, total_cents, currency, created_at, metadata)
SELECT md5('order-' || g)::uuid,
       (g * 7919) % 50000 + 1,
       g % 7 + 1,
       (ARRAY['paid', ' Paid', 'PAID ', 'pending', 'Pending ', 'shipped', 'SHIPPED',
              'refunded', ' Refunded', 'cancelled', 'Cancelled '])[g % 11 + 1],
       100 + (g * 104729) % 99900,
       (ARRAY['usd', 'USD', 'eur', 'EUR', 'gbp'])[g % 5 + 1],
       timestamptz '2026-09-01 00:00:00+00' + ((g * 613) % (90 * 86400)) * interval '1 second',
       jsonb_build_object('channel', (ARRAY['web', 'ios', 'android'])[g % 3 + 1],
                          'coupon', CASE WHEN g % 10 = 0 THEN 'SAVE10' END)
FROM generate_series(1::bigint, :rows) g;
ANALYZE public.orders;
