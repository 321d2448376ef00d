-- title: Blocked attempts
-- description: Requests that were blocked or denied, per identity, target and rule.
SELECT s.identity, s.target, r.decision, r.rule,
       count(*) AS attempts, count(DISTINCT r.session_id) AS sessions,
       min(r.ts) AS first_seen, max(r.ts) AS last_seen
FROM requests r
LEFT JOIN sessions s USING (session_id)
WHERE r.decision IN ('block', 'deny')
GROUP BY ALL
ORDER BY attempts DESC, s.identity, s.target, r.decision, r.rule
