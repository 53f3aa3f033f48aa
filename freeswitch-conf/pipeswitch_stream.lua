-- Pipeswitch: start the AI agent stream from Lua (FusionPBX: an `action lua pipeswitch_stream.lua` row).
-- Relays DTMF to Pipeswitch as {"event":"dtmf","digit":"5"} (no spaces: send_text keeps only
-- the first token of its argument).
local api = freeswitch.API()
local uuid = session:get_uuid()
local domain = session:getVariable("domain_name") or "default"
local host = session:getVariable("pipeswitch_host") or "127.0.0.1:8080"
session:answer()
session:setVariable("STREAM_MESSAGE_DEFLATE", "true")
session:setVariable("STREAM_HEART_BEAT", "0")
local url = "ws://" .. host .. "/fs/" .. uuid .. "?domain=" .. domain .. "&rate=8000&mix=mono"
local meta = '{"uuid":"' .. uuid .. '","caller":"' .. (session:getVariable("caller_id_number") or "") .. '"}'
local r = api:executeString("uuid_audio_stream " .. uuid .. " start " .. url .. " mono 8k " .. meta)
freeswitch.consoleLog("info", "pipeswitch: uuid_audio_stream start: " .. tostring(r) .. "\n")

function on_dtmf(s, t, obj, arg)
  if t == "dtmf" then
    api:executeString("uuid_audio_stream " .. uuid .. ' send_text {"event":"dtmf","digit":"' .. obj.digit .. '"}')
  end
  return ""
end
session:setInputCallback("on_dtmf", "")
while session:ready() do session:streamFile("silence_stream://1000") end
