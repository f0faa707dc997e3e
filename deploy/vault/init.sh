#!/bin/sh
# One-shot set-up of the dev Vault for docker-compose.yml (the vault-init service):
# KV v2 at the fleet's mount, the workers' least-privilege policy, a token for the workers
# (written to the shared vault-token volume, read through FLEET_VAULT_TOKEN_FILE), and one
# sample managed secret so that secrets.check_rotation has something to report.
# Idempotent: running it again changes nothing but the token.
set -eu

: "${VAULT_ADDR:?set VAULT_ADDR}"
: "${VAULT_TOKEN:?set VAULT_TOKEN (the dev root token)}"
MOUNT="${FLEET_VAULT_MOUNT:-secret}"
PREFIX="${FLEET_VAULT_PATH_PREFIX:-platform}"
POLICY_FILE="${POLICY_FILE:-/deploy/vault/fleet-policy.hcl}"
TOKEN_FILE="${TOKEN_FILE:-/vault-token/token}"

if vault secrets list -format=json | grep -q "\"${MOUNT}/\""; then
  # Dev mode mounts KV v2 at secret/ already; make sure it is version 2.
  vault kv enable-versioning "${MOUNT}/" >/dev/null
else
  vault secrets enable -path="${MOUNT}" -version=2 kv
fi

vault policy write config-fleet "${POLICY_FILE}"

umask 077
vault token create -policy=config-fleet -period=768h -display-name=config-fleet \
  -field=token >"${TOKEN_FILE}.new"
chmod 0444 "${TOKEN_FILE}.new"
mv "${TOKEN_FILE}.new" "${TOKEN_FILE}"

if ! vault kv metadata get -mount="${MOUNT}" "${PREFIX}/apis/payments" >/dev/null 2>&1; then
  vault kv put -mount="${MOUNT}" "${PREFIX}/apis/payments" api_key="demo-$(date +%s)" >/dev/null
  vault kv metadata put -mount="${MOUNT}" -custom-metadata=rotation_interval_days=30 \
    -custom-metadata=owner=payments "${PREFIX}/apis/payments" >/dev/null
fi
echo "vault-init: ${MOUNT}/ is KV v2, policy config-fleet written, worker token in ${TOKEN_FILE}"
