-- POST /search with {"id": random id}: ids 0..IDS-1, the path and query from SEARCH (default /search?k=10)
local n = tonumber(os.getenv("IDS") or "50000")
math.randomseed(os.time())
request = function()
  local body = string.format('{"id": %d}', math.random(0, n - 1))
  return wrk.format("POST", os.getenv("SEARCH") or "/search?k=10", {["Content-Type"] = "application/json"}, body)
end
response = function(status, headers, body)
  if status ~= 200 then io.stderr:write("status " .. status .. "\n") end
end
