#!/bin/bash
# HEALTHCHECK of the nats image: GET /healthz on the monitoring port (8222) with bash's
# /dev/tcp; healthy on 200 (JetStream included when enabled).
exec 3<>/dev/tcp/127.0.0.1/8222 || exit 1
printf 'GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
answer="$(timeout 3 cat <&3)" || true
case "${answer%%$'\r'*}" in
  "HTTP/1."?" 200"*) exit 0 ;;
esac
echo "${answer:-no answer}"
exit 1
