-- title: Sessions per process executable
-- description: Sessions per attested executable and uid, with the identities and targets seen, traffic and outcomes.
SELECT coalesce(s.exe, '(unattributed)') AS exe, s.uid,
       count(*) AS sessions,
       list_sort(list_distinct(list(s.identity))) AS identities,
       list_sort(list_distinct(list(s.target))) AS targets,
       sum(s.bytes_in) AS bytes_in, sum(s.bytes_out) AS bytes_out,
       count(*) FILTER (s.outcome <> 'ok' AND s.outcome <> 'open') AS not_ok,
       min(s.started_at) AS first_seen, max(s.started_at) AS last_seen
FROM sessions s
GROUP BY ALL
ORDER BY sessions DESC, exe, s.uid
