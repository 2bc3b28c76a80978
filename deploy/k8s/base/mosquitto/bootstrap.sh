#!/bin/sh
# Init container of the zone broker (same image as the broker). Idempotent; runs on every start.
#  1. writes /mosquitto/run/mosquitto.conf: the base config, the zone's listeners and, when
#     /etc/mosquitto-bridge/address exists (fog zone), a bridge to the edge broker;
#  2. creates the dynamic-security file with the admin account on the first start;
#  3. starts a private broker on 127.0.0.1:1884 and makes sure of the accounts metertwin needs:
#     role + client `twin-service` (every topic, plus dynsec admin: the edge-registry function
#     creates the meters' accounts with it) and, when the zone has a bridge password,
#     the read-only `fog-bridge` account (edge) the fog broker bridges readings with.
# Passwords come from the secret mounted at /etc/mosquitto-accounts and are never printed.
set -eu
DATA=/mosquitto/data
DYNSEC=$DATA/dynamic-security.json
ACCOUNTS=/etc/mosquitto-accounts
ADMIN_PW=$(cat "$ACCOUNTS/admin-password")
SERVICE_PW=$(cat "$ACCOUNTS/service-password")

mkdir -p /mosquitto/run
{
  cat /etc/mosquitto/mosquitto.conf
  echo
  cat /etc/mosquitto/listeners.conf
  if [ -f /etc/mosquitto-bridge/address ]; then
    echo
    echo "connection edge"
    echo "address $(cat /etc/mosquitto-bridge/address)"
    echo "remote_clientid fog-bridge-$(hostname)"
    echo "remote_username fog-bridge"
    echo "remote_password $(cat "$ACCOUNTS/bridge-password")"
    echo "cleansession false"
    echo "try_private false"
    echo "bridge_cafile /etc/ssl/certs/ca-certificates.crt"
    echo "topic meters/+/up/reading in 1"
    echo "topic dcu/+/up/readings in 1"
  fi
} > /mosquitto/run/mosquitto.conf
chmod 600 /mosquitto/run/mosquitto.conf

if [ ! -f "$DYNSEC" ]; then
  mosquitto_ctrl dynsec init "$DYNSEC" dynsec-admin "$ADMIN_PW" >/dev/null
fi

cat > /tmp/bootstrap.conf <<CONF
per_listener_settings false
allow_anonymous false
listener 1884 127.0.0.1
plugin /usr/lib/mosquitto_dynamic_security.so
plugin_opt_config_file $DYNSEC
persistence false
log_type error
log_type warning
CONF
mosquitto -c /tmp/bootstrap.conf &
BROKER=$!
ctl() { mosquitto_ctrl -h 127.0.0.1 -p 1884 -u dynsec-admin -P "$ADMIN_PW" dynsec "$@" >/dev/null 2>&1; }
tries=0
until ctl listRoles; do
  tries=$((tries + 1))
  if [ "$tries" -ge 100 ]; then echo "bootstrap broker did not start" >&2; kill "$BROKER"; exit 1; fi
  sleep 0.1
done

# "already exists" answers are expected on every start after the first: ignore them.
ctl createRole twin-service || true
for acl in publishClientSend publishClientReceive subscribePattern unsubscribePattern; do
  ctl addRoleACL twin-service "$acl" '#' allow || true
done
ctl createClient twin-service -p "$SERVICE_PW" || true
ctl setClientPassword twin-service "$SERVICE_PW"
ctl addClientRole twin-service twin-service || true
ctl addClientRole twin-service admin || true

if [ -f "$ACCOUNTS/bridge-password" ] && [ ! -f /etc/mosquitto-bridge/address ]; then
  BRIDGE_PW=$(cat "$ACCOUNTS/bridge-password")
  ctl createRole fog-bridge || true
  ctl addRoleACL fog-bridge subscribePattern 'meters/+/up/reading' allow || true
  ctl addRoleACL fog-bridge publishClientReceive 'meters/+/up/reading' allow || true
  ctl addRoleACL fog-bridge subscribePattern 'dcu/+/up/readings' allow || true
  ctl addRoleACL fog-bridge publishClientReceive 'dcu/+/up/readings' allow || true
  ctl createClient fog-bridge -p "$BRIDGE_PW" || true
  ctl setClientPassword fog-bridge "$BRIDGE_PW"
  ctl addClientRole fog-bridge fog-bridge || true
fi

kill "$BROKER"
wait "$BROKER" || true
echo "mosquitto accounts ready"
