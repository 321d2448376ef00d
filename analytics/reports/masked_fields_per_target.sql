-- title: Masked fields per target
-- description: How many values of each column were masked, per target, with the rules involved.
SELECT s.target, m.column_name, sum(m.masked_count) AS values_masked,
       count(DISTINCT m.request_id) AS requests, list_sort(list_distinct(list(m.rule))) AS rules
FROM masked_fields m
LEFT JOIN sessions s USING (session_id)
GROUP BY ALL
ORDER BY values_masked DESC, s.target, m.column_name
