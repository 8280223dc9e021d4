#!/bin/sh
# The steps of the compose demo (deploy/compose/compose.yaml) that are not a long-running
# broker. POSIX sh, run inside the govshare image; every step can also be run by hand on one
# machine with the release binaries (see the environment variables below).
#
#   demo.sh pki       once, before any broker starts: the national hub's data dir, the link
#                     identities it issues to the two provinces (made on the hub's volume),
#                     the provinces' data dirs (init --parent), and the two departments'
#                     identities. Skipped when the hub's data dir is initialised already.
#   demo.sh setup     once the three brokers are up: register the departments, publish the
#                     provider's dataset, file the consumer's demand and approve it.
#   demo.sh provider  serve the provider's rows (deploy/examples/pension-rows.jsonl).
#   demo.sh consumer  ask for a row every $EVERY seconds, forever (traffic for the dashboard).
#
# What is not automated: a real deployment brings its own CA and keeps the CA key off the
# brokers; here `init` makes a development CA per broker, as the README's walk-through does.
set -eu

DATA=${DATA:-/data}                           # national/, zhejiang/, guangdong/, ids/
IDS=${IDS:-$DATA/ids}                         # link and department identities, shared
EXAMPLES=${EXAMPLES:-/examples}               # deploy/examples
HUB_NAME=${HUB_NAME:-hub}                     # the hub's host name (a SAN of its certificate)
ZJ_NAME=${ZJ_NAME:-zhejiang}
GD_NAME=${GD_NAME:-guangdong}
HUB_URL=${HUB_URL:-https://$HUB_NAME:7443}
ZJ_URL=${ZJ_URL:-https://$ZJ_NAME:7443}
GD_URL=${GD_URL:-https://$GD_NAME:7443}
LISTEN=${LISTEN:-0.0.0.0:7443}                # written into each config.toml
OWNER=${OWNER:-10001:10001}                   # the image's govshare user; "" skips the chown
EVERY=${EVERY:-5}

PROVIDER=330000/hrss                          # at Zhejiang: pension payments
CONSUMER=440000/civil                         # at Guangdong: checks social-assistance eligibility
DATASET=$PROVIDER/pension-status

say() { echo "demo: $*"; }

# Retries "$@" until it succeeds (at most about two minutes).
retry() {
  n=0
  until "$@"; do
    n=$((n + 1))
    if [ "$n" -ge 120 ]; then
      say "gave up after $n tries: $*" >&2
      return 1
    fi
    sleep 1
  done
}

pki() {
  if [ -f "$DATA/national/config.toml" ]; then
    say "$DATA/national is initialised already; nothing to do"
    return 0
  fi
  govshare-broker init --data-dir "$DATA/national" --id 000000/hub --san "$HUB_NAME" --listen "${HUB_LISTEN:-$LISTEN}"
  # The hub issues each province the identity for its link (made on the hub's volume).
  govshare-broker issue --data-dir "$DATA/national" --node 330000/hub --role broker --out "$IDS/links/zhejiang"
  govshare-broker issue --data-dir "$DATA/national" --node 440000/hub --role broker --out "$IDS/links/guangdong"
  govshare-broker init --data-dir "$DATA/zhejiang" --id 330000/hub --san "$ZJ_NAME" --listen "${ZJ_LISTEN:-$LISTEN}" \
    --parent "$HUB_URL" --parent-identity "$IDS/links/zhejiang"
  govshare-broker init --data-dir "$DATA/guangdong" --id 440000/hub --san "$GD_NAME" --listen "${GD_LISTEN:-$LISTEN}" \
    --parent "$HUB_URL" --parent-identity "$IDS/links/guangdong"
  # Departments get their identities from their own province's CA.
  govshare-broker issue --data-dir "$DATA/zhejiang" --node "$PROVIDER" --out "$IDS/zj-hrss"
  govshare-broker issue --data-dir "$DATA/guangdong" --node "$CONSUMER" --out "$IDS/gd-civil"
  # The setup step acts as each province's admin.
  cp -R "$DATA/zhejiang/admin" "$IDS/zj-admin"
  cp -R "$DATA/guangdong/admin" "$IDS/gd-admin"
  if [ -n "$OWNER" ]; then
    # Fresh named volumes are owned by root; the brokers run as the image's uid 10001.
    chown -R "$OWNER" "$DATA/national" "$DATA/zhejiang" "$DATA/guangdong" "$IDS"
  fi
  say "initialised the hub, two provinces and two department identities"
}

setup() {
  if [ -f "$IDS/setup-done" ]; then
    say "set up already (remove $IDS/setup-done to run again)"
    return 0
  fi
  zj_admin() { govshare --broker "$ZJ_URL" --identity "$IDS/zj-admin" "$@"; }
  gd_admin() { govshare --broker "$GD_URL" --identity "$IDS/gd-admin" "$@"; }
  provider() { govshare --broker "$ZJ_URL" --identity "$IDS/zj-hrss" "$@"; }
  consumer() { govshare --broker "$GD_URL" --identity "$IDS/gd-civil" "$@"; }
  retry zj_admin -q whoami
  retry gd_admin -q whoami
  zj_admin node list -q | grep -qx "$PROVIDER" ||
    zj_admin node register --id "$PROVIDER" --name "浙江省人力资源和社会保障厅"
  gd_admin node list -q | grep -qx "$CONSUMER" ||
    gd_admin node register --id "$CONSUMER" --name "广东省民政厅"
  provider catalog publish "$EXAMPLES/pension-status.json"
  # The catalog cascades Zhejiang -> hub -> Guangdong once both links are up.
  retry consumer -q catalog show "$DATASET"
  demand=$(consumer -q demand file --dataset "$DATASET" --fields id_number,name,status,month \
    --purpose "最低生活保障资格核验" --legal-basis "社会救助暂行办法 第十一条" --days 365)
  say "demand $demand filed; waiting for it to reach the provider's broker"
  retry sh -c "govshare --broker '$ZJ_URL' --identity '$IDS/zj-hrss' -q demand list --incoming | grep -qx '$demand'"
  grant=$(provider -q demand approve "$demand" --fields id_number,status,month --days 365)
  say "grant $grant issued"
  touch "$IDS/setup-done"
}

serve() {
  exec govshare --broker "$ZJ_URL" --identity "$IDS/zj-hrss" serve --dataset "$DATASET" \
    --from-file "$EXAMPLES/pension-rows.jsonl"
}

consume() {
  retry test -f "$IDS/setup-done"
  while :; do
    for id in 330102199001011234 330108194912240016 330000000000000000; do
      govshare --broker "$GD_URL" --identity "$IDS/gd-civil" exchange request --dataset "$DATASET" \
        --where "id_number=$id" || say "request failed (the provider may be starting); trying again"
      sleep "$EVERY"
    done
  done
}

case "${1:-}" in
  pki) pki ;;
  setup) setup ;;
  provider) serve ;;
  consumer) consume ;;
  *)
    echo "usage: demo.sh pki|setup|provider|consumer" >&2
    exit 2
    ;;
esac
