-- Pipeswitch turn-based agent (FreeSWITCH / FusionPBX Lua; run from the dialplan:
-- <action application="lua" data="pipeswitch_turn_based.lua"/>).
--
-- For a PBX where no streaming is allowed: record one caller turn (recording stops on
-- silence), POST it to Pipeswitch as WAV, play the WAV that comes back, and act on the
-- reply's X-Pipeswitch-Action header: continue (loop), transfer (to
-- X-Pipeswitch-Transfer-To in X-Pipeswitch-Context), hangup. Any failure (Pipeswitch
-- down, refused, timed out) sends the caller to pipeswitch_fallback: never dead air.
--
-- Channel variables read: pipeswitch_http (default http://127.0.0.1:8080),
-- pipeswitch_fallback (extension; empty = hang up on failure), domain_name.
-- Needs the curl command-line tool on the FreeSWITCH host.

local uuid = session:get_uuid()
local base = session:getVariable("pipeswitch_http") or "http://127.0.0.1:8080"
local fallback = session:getVariable("pipeswitch_fallback") or ""
local context = session:getVariable("context") or "default"
local domain = session:getVariable("domain_name") or "default"
local tmp = session:getVariable("temp_dir") or "/tmp"
local rate = 8000                 -- what Pipeswitch answers in; recordings may be any rate
local max_turn_secs = 20          -- longest caller turn
local silence_threshold = 200     -- energy threshold for "silence"
local silence_secs = 1            -- this much silence ends the turn
local max_turns = 40

-- Only safe characters reach the shell command line.
if not domain:match("^[%w%.%-]+$") then domain = "default" end
if not base:match("^https?://[%w%.%-:]+$") then base = "http://127.0.0.1:8080" end
if not uuid:match("^[%w%-]+$") then session:hangup("NORMAL_TEMPORARY_FAILURE") return end

local function log(level, msg)
  freeswitch.consoleLog(level, "pipeswitch " .. uuid .. ": " .. msg .. "\n")
end

local function url(path)
  return base .. path .. uuid .. "?domain=" .. domain .. "&rate=" .. rate
end

-- POST a recording (nil = the call just started: ask for the greeting).
-- Returns the reply WAV path and a table of the reply's X-Pipeswitch-* headers.
local function post_turn(wav)
  local reply = tmp .. "/pipeswitch_" .. uuid .. "_reply.wav"
  local head = tmp .. "/pipeswitch_" .. uuid .. "_head.txt"
  os.remove(reply)
  local data = wav and ("--data-binary @" .. wav) or "--data-binary ''"
  local cmd = "curl -sS -m 25 -X POST -H 'Content-Type: audio/wav' " .. data ..
    " -D " .. head .. " -o " .. reply .. " '" .. url("/turn/") .. "'"
  local ok = os.execute(cmd)
  local headers = {}
  local f = io.open(head, "r")
  if f then
    for line in f:lines() do
      local status = line:match("^HTTP/%S+%s+(%d+)")
      if status then headers["status"] = status end
      local k, v = line:match("^[Xx]%-[Pp]ipeswitch%-([%w%-]+):%s*([^\r\n]*)")
      if k then headers[k:lower()] = v end
    end
    f:close()
    os.remove(head)
  end
  if not ok or headers["status"] ~= "200" then
    return nil, headers
  end
  return reply, headers
end

local function go_fallback(why)
  log("WARNING", why .. "; caller to fallback '" .. fallback .. "'")
  if fallback ~= "" and session:ready() then
    session:transfer(fallback, "XML", context)
  elseif session:ready() then
    session:hangup("NORMAL_TEMPORARY_FAILURE")
  end
end

local function forget()
  os.execute("curl -sS -m 3 -X DELETE '" .. url("/turn/") .. "' >/dev/null 2>&1")
end

session:answer()
session:setVariable("playback_terminators", "none")
local reply, h = post_turn(nil)   -- the greeting
if not reply then
  go_fallback("greeting failed (HTTP " .. tostring(h["status"]) .. ")")
  return
end
session:streamFile(reply)

local turns = 0
while session:ready() and turns < max_turns do
  turns = turns + 1
  local rec = tmp .. "/pipeswitch_" .. uuid .. "_turn.wav"
  session:recordFile(rec, max_turn_secs, silence_threshold, silence_secs)
  if not session:ready() then break end
  reply, h = post_turn(rec)
  os.remove(rec)
  if not reply then
    go_fallback("turn failed (HTTP " .. tostring(h["status"]) .. ")")
    break
  end
  session:streamFile(reply)
  os.remove(reply)
  local action = h["action"] or "continue"
  if action == "transfer" and h["transfer-to"] and h["transfer-to"]:match("^[%w%*#%+_%.@%-]+$") then
    local ctx = h["context"] or context
    log("INFO", "transfer to " .. h["transfer-to"] .. " in " .. ctx)
    forget()
    session:transfer(h["transfer-to"], "XML", ctx)
    return
  elseif action == "hangup" then
    forget()
    session:hangup("NORMAL_CLEARING")
    return
  end
end
forget()
if session:ready() and turns >= max_turns then go_fallback("too many turns") end
