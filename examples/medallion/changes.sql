-- What happens to the source between two nightly runs: some orders move on (pending →
-- paid, paid → shipped, a few refunded or cancelled), new orders arrive. The trigger
-- moves `updated_at` for every row touched. Run with psql `-v new_rows=5000`.
UPDATE public.orders SET status = 'Paid'
 WHERE lower(trim(status)) = 'pending' AND (hashtext(id::text) & 3) = 0;
UPDATE public.orders SET status = ' shipped'
 WHERE lower(trim(status)) = 'paid' AND (hashtext(id::text) & 15) = 1;
UPDATE public.orders SET status = 'REFUNDED'
 WHERE lower(trim(status)) = 'shipped' AND (hashtext(id::text) & 63) = 2;
UPDATE public.orders SET status = 'cancelled', metadata = metadata || '{"reason": "customer"}'
 WHERE lower(trim(status)) = 'pending' AND (hashtext(id::text) & 31) = 3;

INSERT INTO public.orders (id, user_id, tenant_id, status, total_cents, currency, created_at, metadata)
SELECT md5('order-next-' || n || '-' || g)::uuid,
       (g * 7919) % 50000 + 1,
       g % 7 + 1,
       (ARRAY['pending', 'Paid', 'paid '])[g % 3 + 1],
       100 + (g * 104729) % 99900,
       (ARRAY['usd', 'EUR', 'gbp'])[g % 3 + 1],
       now() - (g % 86400) * interval '1 second',
       jsonb_build_object('channel', 'web')
FROM generate_series(1::bigint, :new_rows) g,
     (SELECT count(*) AS n FROM public.orders) c;
ANALYZE public.orders;
