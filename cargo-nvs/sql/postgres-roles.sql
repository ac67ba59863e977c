-- The database roles a factory gives the people and PCs that share a cargo-nvs ledger in
-- PostgreSQL. Run it as the ledger's owner once its tables exist:
--
--     cargo nvs mfg ledger init --ledger postgres://OWNER@HOST/DB --roles
--
-- (which creates the tables and runs this file), or `psql -d DB -f postgres-roles.sql` after
-- `cargo nvs mfg ledger init --ledger postgres://OWNER@HOST/DB`. Running it again changes
-- nothing. Then give each person and station its own login in one of the two roles:
--
--     CREATE ROLE gen_alice LOGIN PASSWORD '…' IN ROLE nvs_generator;
--     CREATE ROLE station_line1_pc3 LOGIN PASSWORD '…' IN ROLE nvs_station;
--
-- nvs_generator issues devices and stores their images (`mfg generate --store-images`) and
-- reads everything. nvs_station claims devices, writes the production log, and reads the
-- stored images and keys of the devices its own login holds a claim on, and of no other (the
-- policy on nvs_device_files below; who holds a claim is set by a trigger to the login that
-- wrote it). A station login cannot issue, store or change images, nor change the log.

-- Roles belong to the whole server: another database's ledger may have made them already.
DO $$
BEGIN
    CREATE ROLE nvs_generator NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;
DO $$
BEGIN
    CREATE ROLE nvs_station NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;

GRANT USAGE ON SCHEMA public TO nvs_generator, nvs_station;

-- The generator: issue, reserve, store; read the log and the status.
GRANT SELECT ON nvs_meta, nvs_flash_log TO nvs_generator;
GRANT SELECT, INSERT, UPDATE, DELETE
    ON nvs_batches, nvs_devices, nvs_device_images, nvs_device_files TO nvs_generator;

-- The station: read what to flash, claim it, log it.
GRANT SELECT ON nvs_meta, nvs_batches, nvs_devices, nvs_device_images, nvs_flash_log,
    nvs_device_files TO nvs_station;
GRANT UPDATE (claimant, claimed_at, written_to, flashed) ON nvs_devices TO nvs_station;
GRANT INSERT ON nvs_flash_log TO nvs_station;
GRANT USAGE ON SEQUENCE nvs_flash_log_id_seq TO nvs_station;

-- Key material: a station sees only the files of devices its login holds a claim on.
ALTER TABLE nvs_device_files ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS nvs_generator_all ON nvs_device_files;
CREATE POLICY nvs_generator_all ON nvs_device_files TO nvs_generator
    USING (true) WITH CHECK (true);
DROP POLICY IF EXISTS nvs_station_claimed ON nvs_device_files;
CREATE POLICY nvs_station_claimed ON nvs_device_files FOR SELECT TO nvs_station
    USING (EXISTS (SELECT 1 FROM nvs_devices d
                   WHERE d.device = nvs_device_files.device
                     AND d.claimed_by = current_user AND NOT d.flashed));
