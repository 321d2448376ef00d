-- title: Approval latency
-- description: Time from 'requested' to the final decision of each held request, per target and rule and final event (approved, denied, expired, abandoned, cancelled_restart).
WITH requested AS (
    SELECT approval_id, min(ts) AS requested_at, any_value(target) AS target, any_value(rule) AS rule,
           any_value(identity) AS identity
    FROM approvals WHERE event = 'requested' GROUP BY approval_id
), decided AS (
    SELECT approval_id, event AS outcome, ts AS decided_at, operator
    FROM approvals
    WHERE event IN ('approved', 'denied', 'expired', 'abandoned', 'cancelled_restart')
    QUALIFY row_number() OVER (PARTITION BY approval_id ORDER BY ts, chain_seq) = 1
)
SELECT q.target, q.rule, d.outcome, count(*) AS approvals,
       round(avg(epoch_ms(d.decided_at) - epoch_ms(q.requested_at)) / 1000.0, 3) AS avg_s,
       round(quantile_cont(epoch_ms(d.decided_at) - epoch_ms(q.requested_at), 0.5) / 1000.0, 3) AS p50_s,
       round(quantile_cont(epoch_ms(d.decided_at) - epoch_ms(q.requested_at), 0.95) / 1000.0, 3) AS p95_s,
       round(max(epoch_ms(d.decided_at) - epoch_ms(q.requested_at)) / 1000.0, 3) AS max_s
FROM requested q JOIN decided d USING (approval_id)
GROUP BY ALL
ORDER BY q.target, q.rule, d.outcome
