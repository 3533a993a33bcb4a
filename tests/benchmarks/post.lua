-- wrk script of tests.benchmarks.proxy_overhead (perf-baseline.md's post.lua, parameterised).
-- A 201-byte JSON-RPC tools/call POST; the tenant key comes from BENCH_KEY. BENCH_BODY and
-- BENCH_ACCEPT override the body and add an Accept header (used for the official-SDK upstream).
-- done() prints the RESULT line of perf-baseline.md plus a STATS line with counts and errors.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_KEY") or "sk-test-0000000000000000000000000001")
local accept = os.getenv("BENCH_ACCEPT")
if accept ~= nil and accept ~= "" then wrk.headers["Accept"] = accept end
local body = os.getenv("BENCH_BODY")
if body ~= nil and body ~= "" then
  wrk.body = body
else
  wrk.body = '{"jsonrpc":"2.0","id":42,"method":"tools/call","params":{"name":"search_docs","arguments":{"query":"quarterly revenue by region","limit":10,"snippets":true,"filters":{"lang":"en","source":"finance"}}}}'
end
done = function(s, lat, req)
  io.write(string.format("RESULT rps=%.1f p50_ms=%.3f p99_ms=%.3f\n",
    s.requests / (s.duration / 1e6), lat:percentile(50) / 1000, lat:percentile(99) / 1000))
  io.write(string.format("STATS requests=%d duration_us=%d status_errors=%d connect_errors=%d read_errors=%d write_errors=%d timeouts=%d\n",
    s.requests, s.duration, s.errors.status, s.errors.connect, s.errors.read, s.errors.write, s.errors.timeout))
end
