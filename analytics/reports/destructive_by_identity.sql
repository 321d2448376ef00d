-- title: Destructive statements by identity
-- description: DELETE, UPDATE, MERGE, TRUNCATE, DROP and ALTER statements (also inside CTEs), per identity and target, with the decision taken. Statement types come from the PostgreSQL parser (pglast) over the stored, masked text.
-- needs: pg_statements
SELECT s.identity, s.target, r.decision,
       list_sort(list_distinct(flatten(list(p.statement_types)))) AS statement_types,
       count(*) AS requests,
       min(r.ts) AS first_seen, max(r.ts) AS last_seen
FROM requests r
JOIN pg_statements p ON p.text = r.text
LEFT JOIN sessions s USING (session_id)
WHERE p.destructive
GROUP BY ALL
ORDER BY requests DESC, s.identity, s.target, r.decision, statement_types
