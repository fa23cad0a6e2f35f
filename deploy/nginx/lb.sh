#!/bin/sh
# Entrypoint of the compose `lb`: nginx in the foreground, reloaded (graceful: in-flight requests
# finish on the old workers) whenever Docker's DNS answer for the replicas changes, so that the
# upstream in nginx.conf follows scale-out, scale-in and recreated replicas. SIGTERM/SIGINT stop
# nginx quickly, SIGQUIT gracefully, as for nginx itself. Needs only sh, getent, awk and sort.
set -u
name=${LB_UPSTREAM_NAME:-deqguard}
every=${LB_RERESOLVE_S:-5}

addrs() { getent ahostsv4 "$name" 2>/dev/null | awk '{print $1}' | sort -u | tr '\n' ' '; }

# the replicas must resolve before nginx can load its upstream; wait for them
i=0
while [ -z "$(addrs)" ] && [ $i -lt 120 ]; do sleep 1; i=$((i + 1)); done
known=$(addrs)
echo "lb: $name -> ${known:-nothing (nginx will refuse the upstream)}"

nginx -g 'daemon off;' &
pid=$!
trap 'kill -TERM $pid' TERM INT
trap 'kill -QUIT $pid' QUIT

while kill -0 $pid 2>/dev/null; do
    sleep "$every" &
    wait $! 2>/dev/null
    now=$(addrs)
    if [ -n "$now" ] && [ "$now" != "$known" ]; then
        echo "lb: $name -> $now (was $known): reloading nginx"
        nginx -s reload && known=$now
    fi
done
wait $pid
