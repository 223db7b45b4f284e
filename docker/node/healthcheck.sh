#!/bin/bash
# HEALTHCHECK of the node image: GET /healthz on the admin API with bash's /dev/tcp (the
# image has no curl). Healthy on 200; otherwise prints the answer (docker inspect shows it).
port="${OC_DISCOVERY_ADMIN_LISTEN:-127.0.0.1:8650}"
port="${port##*:}"
exec 3<>"/dev/tcp/127.0.0.1/${port}" || exit 1
printf 'GET /healthz HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n' >&3
answer="$(timeout 3 cat <&3)" || true
case "${answer%%$'\r'*}" in
  "HTTP/1."?" 200"*) exit 0 ;;
esac
echo "${answer:-no answer}"
exit 1
