-- Pipeswitch tables inside FusionPBX's database (FusionPBX conventions: v_ prefix,
-- <table>_uuid primary keys, domain_uuid NOT NULL on every tenant table, insert/update dates).
-- Idempotent: every statement can run again on a database that already has it.

-- FusionPBX owns v_domains. A standalone install (no FusionPBX) gets the minimal shape that
-- FusionPBX's own schema upgrade later extends (it adds missing columns, never drops).
CREATE TABLE IF NOT EXISTS v_domains (
    domain_uuid uuid PRIMARY KEY,
    domain_parent_uuid uuid,
    domain_name text,
    domain_enabled text DEFAULT 'true',
    domain_description text
);
CREATE INDEX IF NOT EXISTS v_domains_domain_name_idx ON v_domains (lower(domain_name));

-- Per-domain access and policy: stream signing secret (Fernet-encrypted), the static stream
-- token (sha256 only), the concurrent-call limit, retention, audio recording (off: GDPR).
CREATE TABLE IF NOT EXISTS v_voice_domains (
    voice_domain_uuid uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    domain_uuid uuid NOT NULL UNIQUE REFERENCES v_domains (domain_uuid) ON DELETE CASCADE,
    signing_secret_enc text,
    stream_token_hash text,
    max_concurrent_calls integer CHECK (max_concurrent_calls IS NULL OR max_concurrent_calls >= 0),
    retention_days integer CHECK (retention_days IS NULL OR retention_days > 0),
    record_audio boolean NOT NULL DEFAULT false,
    voice_domain_enabled boolean NOT NULL DEFAULT true,
    insert_date timestamptz NOT NULL DEFAULT now(),
    update_date timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS v_voice_agents (
    voice_agent_uuid uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    domain_uuid uuid NOT NULL REFERENCES v_domains (domain_uuid) ON DELETE CASCADE,
    agent_name text NOT NULL,
    agent_default boolean NOT NULL DEFAULT false,
    system_prompt text,
    first_message text,
    language text NOT NULL DEFAULT 'en',
    pipeline text NOT NULL DEFAULT 'cascade',
    providers jsonb NOT NULL DEFAULT '{}'::jsonb,
    turns jsonb NOT NULL DEFAULT '{}'::jsonb,
    voice text,
    playback text NOT NULL DEFAULT 'json-stream',
    module_build text,
    audio_rate integer NOT NULL DEFAULT 8000,
    audio_mix text NOT NULL DEFAULT 'mono',
    max_call_secs real,
    agent_enabled boolean NOT NULL DEFAULT true,
    insert_date timestamptz NOT NULL DEFAULT now(),
    update_date timestamptz NOT NULL DEFAULT now(),
    UNIQUE (domain_uuid, agent_name)
);
CREATE INDEX IF NOT EXISTS v_voice_agents_domain_idx ON v_voice_agents (domain_uuid);
-- One default agent per domain (the one answering calls with no routed destination).
CREATE UNIQUE INDEX IF NOT EXISTS v_voice_agents_default_idx
    ON v_voice_agents (domain_uuid) WHERE agent_default;

CREATE TABLE IF NOT EXISTS v_voice_routes (
    voice_route_uuid uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    domain_uuid uuid NOT NULL REFERENCES v_domains (domain_uuid) ON DELETE CASCADE,
    destination text NOT NULL,
    voice_agent_uuid uuid NOT NULL REFERENCES v_voice_agents (voice_agent_uuid) ON DELETE CASCADE,
    route_enabled boolean NOT NULL DEFAULT true,
    insert_date timestamptz NOT NULL DEFAULT now(),
    update_date timestamptz NOT NULL DEFAULT now(),
    UNIQUE (domain_uuid, destination)
);
CREATE INDEX IF NOT EXISTS v_voice_routes_agent_idx ON v_voice_routes (voice_agent_uuid);

-- Provider keys per domain: encrypted at rest (Fernet, PIPESWITCH_SECRETS_KEY) or a reference
-- to a deployment secret by name (key_ref: the name of an environment variable).
CREATE TABLE IF NOT EXISTS v_voice_credentials (
    voice_credential_uuid uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    domain_uuid uuid NOT NULL REFERENCES v_domains (domain_uuid) ON DELETE CASCADE,
    provider text NOT NULL,
    api_key_enc text,
    key_ref text,
    insert_date timestamptz NOT NULL DEFAULT now(),
    update_date timestamptz NOT NULL DEFAULT now(),
    UNIQUE (domain_uuid, provider),
    CHECK (api_key_enc IS NOT NULL OR key_ref IS NOT NULL)
);

CREATE TABLE IF NOT EXISTS v_voice_tools (
    voice_tool_uuid uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    domain_uuid uuid NOT NULL REFERENCES v_domains (domain_uuid) ON DELETE CASCADE,
    voice_agent_uuid uuid NOT NULL REFERENCES v_voice_agents (voice_agent_uuid) ON DELETE CASCADE,
    tool_name text NOT NULL,
    tool_settings jsonb NOT NULL DEFAULT '{}'::jsonb,
    tool_enabled boolean NOT NULL DEFAULT true,
    insert_date timestamptz NOT NULL DEFAULT now(),
    update_date timestamptz NOT NULL DEFAULT now(),
    UNIQUE (voice_agent_uuid, tool_name)
);
CREATE INDEX IF NOT EXISTS v_voice_tools_domain_agent_idx
    ON v_voice_tools (domain_uuid, voice_agent_uuid);

CREATE TABLE IF NOT EXISTS v_voice_calls (
    voice_call_uuid uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    domain_uuid uuid NOT NULL REFERENCES v_domains (domain_uuid) ON DELETE CASCADE,
    voice_agent_uuid uuid REFERENCES v_voice_agents (voice_agent_uuid) ON DELETE SET NULL,
    call_uuid text NOT NULL,
    caller text,
    destination text,
    instance text,
    start_stamp timestamptz NOT NULL,
    end_stamp timestamptz,
    duration_secs real,
    end_reason text,
    turn_count integer NOT NULL DEFAULT 0,
    metadata jsonb,
    insert_date timestamptz NOT NULL DEFAULT now(),
    update_date timestamptz NOT NULL DEFAULT now(),
    UNIQUE (domain_uuid, call_uuid)
);
CREATE INDEX IF NOT EXISTS v_voice_calls_domain_start_idx ON v_voice_calls (domain_uuid, start_stamp);
CREATE INDEX IF NOT EXISTS v_voice_calls_domain_caller_idx ON v_voice_calls (domain_uuid, caller);
CREATE INDEX IF NOT EXISTS v_voice_calls_agent_idx ON v_voice_calls (voice_agent_uuid);

CREATE TABLE IF NOT EXISTS v_voice_turns (
    voice_turn_uuid uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    domain_uuid uuid NOT NULL REFERENCES v_domains (domain_uuid) ON DELETE CASCADE,
    voice_call_uuid uuid NOT NULL REFERENCES v_voice_calls (voice_call_uuid) ON DELETE CASCADE,
    turn_index integer NOT NULL,
    role text NOT NULL,
    turn_text text NOT NULL DEFAULT '',
    heard_text text,
    started_at timestamptz,
    ended_at timestamptz,
    latency_ms real,
    interrupted boolean NOT NULL DEFAULT false,
    insert_date timestamptz NOT NULL DEFAULT now(),
    update_date timestamptz NOT NULL DEFAULT now(),
    UNIQUE (voice_call_uuid, turn_index)
);
CREATE INDEX IF NOT EXISTS v_voice_turns_domain_call_idx ON v_voice_turns (domain_uuid, voice_call_uuid);

CREATE TABLE IF NOT EXISTS v_voice_messages (
    voice_message_uuid uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    domain_uuid uuid NOT NULL REFERENCES v_domains (domain_uuid) ON DELETE CASCADE,
    voice_call_uuid uuid REFERENCES v_voice_calls (voice_call_uuid) ON DELETE CASCADE,
    caller_name text,
    caller_number text,
    reason text,
    message_text text,
    insert_date timestamptz NOT NULL DEFAULT now(),
    update_date timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS v_voice_messages_domain_date_idx ON v_voice_messages (domain_uuid, insert_date);
CREATE INDEX IF NOT EXISTS v_voice_messages_domain_number_idx ON v_voice_messages (domain_uuid, caller_number);
CREATE INDEX IF NOT EXISTS v_voice_messages_call_idx ON v_voice_messages (voice_call_uuid);

-- Admin API tokens per domain: only a sha256 of the token is stored.
CREATE TABLE IF NOT EXISTS v_voice_admin_tokens (
    voice_admin_token_uuid uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    domain_uuid uuid NOT NULL REFERENCES v_domains (domain_uuid) ON DELETE CASCADE,
    token_hash text NOT NULL UNIQUE,
    token_description text,
    token_enabled boolean NOT NULL DEFAULT true,
    insert_date timestamptz NOT NULL DEFAULT now(),
    update_date timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS v_voice_admin_tokens_domain_idx ON v_voice_admin_tokens (domain_uuid);

-- Audit log. No FK to v_domains on purpose: the record that a domain's data was deleted must
-- outlive the domain.
CREATE TABLE IF NOT EXISTS v_voice_audit (
    voice_audit_uuid uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    domain_uuid uuid NOT NULL,
    actor text NOT NULL,
    action text NOT NULL,
    details jsonb NOT NULL DEFAULT '{}'::jsonb,
    insert_date timestamptz NOT NULL DEFAULT now(),
    update_date timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS v_voice_audit_domain_date_idx ON v_voice_audit (domain_uuid, insert_date);
