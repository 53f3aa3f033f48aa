-- Pipeswitch fallback watchdog: never leave a caller parked in dead air.
--
-- Runs in the background for the whole switch (not per call): start it at boot from
-- autoload_configs/lua.conf.xml with
--     <param name="startup-script" value="pipeswitch_watchdog.lua"/>
-- (or once by hand: "luarun pipeswitch_watchdog.lua" in fs_cli).
--
-- mod_audio_stream fires CUSTOM mod_audio_stream::disconnect when the server closes the
-- stream (Pipeswitch refused the call: unknown tenant, over capacity; or it ended the
-- stream) and mod_audio_stream::error when it cannot connect at all (Pipeswitch down).
-- For a channel that is still parked and has pipeswitch_fallback set (the
-- freeswitch-conf dialplans set it), this transfers the caller there. A channel the
-- agent transferred or hung up is no longer parked, so it is left alone; a normal
-- "uuid_audio_stream stop" fires no event at all.

local api = freeswitch.API()
local con = freeswitch.EventConsumer("CUSTOM", "mod_audio_stream::disconnect")
con:bind("CUSTOM", "mod_audio_stream::error")
freeswitch.consoleLog("INFO", "pipeswitch watchdog: watching mod_audio_stream disconnects\n")

local function var(uuid, name)
  local v = api:executeString("uuid_getvar " .. uuid .. " " .. name)
  if v == nil or v == "" or v:match("^_undef_") or v:match("^%-ERR") then return nil end
  return v
end

while true do
  local ev = con:pop(1, 1000)           -- block up to 1 s, then loop
  if ev then
    local uuid = ev:getHeader("Unique-ID")
    if uuid and uuid:match("^[%w%-]+$") then
      local fallback = var(uuid, "pipeswitch_fallback")
      local app = var(uuid, "current_application")
      if fallback and app == "park" and fallback:match("^[%w%*#%+_%.@%-]+$") then
        local context = var(uuid, "pipeswitch_context") or var(uuid, "context") or "default"
        freeswitch.consoleLog("WARNING", "pipeswitch watchdog: " .. uuid .. " lost its agent ("
          .. tostring(ev:getHeader("Event-Subclass")) .. " " .. tostring(ev:getBody())
          .. "); to " .. fallback .. "\n")
        api:executeString("uuid_transfer " .. uuid .. " " .. fallback .. " XML " .. context)
      end
    end
  end
end
