# Least privilege for config-fleet's workers on Vault KV v2, with the fleet's defaults
# FLEET_VAULT_MOUNT=secret and FLEET_VAULT_PATH_PREFIX=platform (change both paths if you
# change those). tests/integration/test_secrets.py runs the rotation checks and a full
# rotation under exactly this policy (against the Vault double), and shows that less fails.
#
# Operators add secrets and their rotation metadata (`fleet secrets put`) with their own
# token: the workers never create a managed secret, never delete one, never touch other paths.

# secrets.check_rotation: list the managed secrets, read their metadata (versions, ages,
# custom_metadata rotation_interval_days / rotator).
path "secret/metadata/platform/*" {
  capabilities = ["read", "list"]
}

# secrets.rotate: read the current version, write the next one (check-and-set).
path "secret/data/platform/*" {
  capabilities = ["read", "update"]
}

# secrets.rotate stages the next password under .rotation/ before it changes anything, and
# deletes the staged copy once the rotation is finished (or undone).
path "secret/data/platform/.rotation/*" {
  capabilities = ["create", "read", "update"]
}
path "secret/metadata/platform/.rotation/*" {
  capabilities = ["read", "list", "delete"]
}

# secrets.check_rotation with FLEET_VAULT_DATABASE_MOUNTS=["database"]: list the static roles
# of Vault's database secrets engine and read each definition (its last_vault_rotation and
# rotation_period or rotation_schedule), to see that Vault's own rotations do not stall. A
# definition carries no password; static-creds, which does, is not granted. One pair of
# blocks per mount listed there (rename "database" to yours); drop them if the list is empty.
# tests/integration/test_vault_static_roles.py runs the check under exactly these blocks.
path "database/static-roles" {
  capabilities = ["list"]
}
path "database/static-roles/*" {
  capabilities = ["read", "list"]
}
