-- Live tenant configuration: every change to a domain's voice configuration (or to the domain
-- itself) sends NOTIFY pipeswitch_tenant with the domain_uuid; servers LISTEN and reload that
-- domain only. update_date is kept current by a trigger as FusionPBX's UI does by hand.

CREATE OR REPLACE FUNCTION v_voice_notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('pipeswitch_tenant', OLD.domain_uuid::text);
        RETURN OLD;
    END IF;
    PERFORM pg_notify('pipeswitch_tenant', NEW.domain_uuid::text);
    IF TG_OP = 'UPDATE' AND NEW.domain_uuid IS DISTINCT FROM OLD.domain_uuid THEN
        PERFORM pg_notify('pipeswitch_tenant', OLD.domain_uuid::text);
    END IF;
    RETURN NEW;
END;
$$;

CREATE OR REPLACE FUNCTION v_voice_touch_update_date() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.update_date := now();
    RETURN NEW;
END;
$$;

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['v_voice_domains', 'v_voice_agents', 'v_voice_routes',
                             'v_voice_credentials', 'v_voice_tools', 'v_domains'] LOOP
        BEGIN
            EXECUTE format(
                'CREATE TRIGGER %I AFTER INSERT OR UPDATE OR DELETE ON %I '
                'FOR EACH ROW EXECUTE FUNCTION v_voice_notify_change()',
                t || '_pipeswitch_notify', t);
        EXCEPTION WHEN duplicate_object THEN
            NULL;  -- already there: this migration ran before
        END;
    END LOOP;
    FOREACH t IN ARRAY ARRAY['v_voice_domains', 'v_voice_agents', 'v_voice_routes',
                             'v_voice_credentials', 'v_voice_tools', 'v_voice_calls',
                             'v_voice_messages', 'v_voice_admin_tokens'] LOOP
        BEGIN
            EXECUTE format(
                'CREATE TRIGGER %I BEFORE UPDATE ON %I '
                'FOR EACH ROW EXECUTE FUNCTION v_voice_touch_update_date()',
                t || '_touch', t);
        EXCEPTION WHEN duplicate_object THEN
            NULL;
        END;
    END LOOP;
END;
$$;
