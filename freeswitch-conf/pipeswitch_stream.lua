-- Pipeswitch: start the AI agent's stream from Lua (FusionPBX: one "action lua
-- pipeswitch_stream.lua" row instead of the XML rows), for any mod_audio_stream build.
--
-- Channel variables read (set them in rows before the lua row):
--   pipeswitch_host      host:port of Pipeswitch (default 127.0.0.1:8080)
--   pipeswitch_build     community | voxcom | cloudfieldcz (default community)
--   pipeswitch_fallback  extension for a caller whose stream fails (empty = hang up)
--   pipeswitch_rate      8000 or 16000 (default 8000)
-- Each build needs its own channel variables (measured on FreeSWITCH 1.10.12):
--   community     nothing extra; Pipeswitch plays the replies over the Event Socket
--   voxcom        STREAM_BUFFER_SIZE=40 (20 deadlocks on hangup), no send_silence_when_idle
--   cloudfieldcz  send_silence_when_idle=-1 (otherwise nothing is heard)
-- DTMF reaches Pipeswitch over the Event Socket (DTMF events; set PIPESWITCH_ESL_*): the
-- script parks the channel, and park runs no Lua input callback.

local api = freeswitch.API()
local uuid = session:get_uuid()
local domain = session:getVariable("domain_name") or "default"
local host = session:getVariable("pipeswitch_host") or "127.0.0.1:8080"
local build = session:getVariable("pipeswitch_build") or "community"
local fallback = session:getVariable("pipeswitch_fallback") or ""
local context = session:getVariable("context") or "default"
local rate = tonumber(session:getVariable("pipeswitch_rate") or "8000") or 8000
if rate ~= 16000 then rate = 8000 end

session:answer()
session:setVariable("pipeswitch_context", context)
session:setVariable("STREAM_MESSAGE_DEFLATE", "true")   -- true = no permessage-deflate
session:setVariable("STREAM_HEART_BEAT", "0")
if build == "voxcom" then
  session:setVariable("STREAM_BUFFER_SIZE", "40")
else
  session:setVariable("STREAM_BUFFER_SIZE", "20")
end
if build == "cloudfieldcz" then
  session:setVariable("send_silence_when_idle", "-1")
end

local url = "ws://" .. host .. "/fs/" .. uuid .. "?domain=" .. domain .. "&rate=" .. rate .. "&mix=mono"
local meta = '{"uuid":"' .. uuid .. '","caller":"' .. (session:getVariable("caller_id_number") or "") .. '"}'
local rate_arg = (rate == 16000) and "16k" or "8k"
local r = api:executeString("uuid_audio_stream " .. uuid .. " start " .. url .. " mono " .. rate_arg .. " " .. meta)
freeswitch.consoleLog("info", "pipeswitch: uuid_audio_stream start (" .. build .. "): " .. tostring(r) .. "\n")
if not tostring(r):match("^%+OK") then
  if fallback ~= "" then
    session:transfer(fallback, "XML", context)
  else
    session:hangup("NORMAL_TEMPORARY_FAILURE")
  end
  return
end

-- park, not a Lua loop: the community build's replies are queued on the channel with
-- ESL sendmsg, which park executes; a Lua loop writing silence would interleave with the
-- voxcom build's audio. A transfer by the agent ends park (and this script).
session:execute("park")
