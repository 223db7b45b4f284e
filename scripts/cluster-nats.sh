#!/usr/bin/env bash
# Talks to a NATS server with bash alone (the NATS text protocol over /dev/tcp), to try the
# docker-compose cluster without a NATS client installed.
#
#   cluster-nats.sh pub PORT SUBJECT JSON       publish one message, wait for the server's PONG
#   cluster-nats.sh sub PORT SUBJECT [SECONDS]  print what arrives (headers, then the payload)
#                                               for SECONDS (default: until Ctrl-C)
#
# PORT is on 127.0.0.1: 14221, 14222, 14223 for sites 1, 2, 3 of docker-compose.yml.
set -euo pipefail
export LC_ALL=C

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 3 ] || usage
cmd="$1" port="$2" subject="$3"

exec 3<>"/dev/tcp/127.0.0.1/$port" || { echo "nothing listens on 127.0.0.1:$port" >&2; exit 1; }
IFS= read -r -t 5 info <&3 || { echo "no INFO from 127.0.0.1:$port" >&2; exit 1; }
case "$info" in INFO*) ;; *) echo "not a NATS server: $info" >&2; exit 1 ;; esac

case "$cmd" in
  pub)
    [ $# -eq 4 ] || usage
    body="$4"
    printf 'CONNECT {"verbose":false,"pedantic":false,"name":"cluster-nats.sh"}\r\nPUB %s %d\r\n%s\r\nPING\r\n' \
      "$subject" "${#body}" "$body" >&3
    while IFS= read -r -t 5 line <&3; do
      line="${line%$'\r'}"
      case "$line" in
        PONG) echo "published on $subject (127.0.0.1:$port)"; exit 0 ;;
        -ERR*) echo "$line" >&2; exit 1 ;;
      esac
    done
    echo "no PONG from the server" >&2
    exit 1
    ;;
  sub)
    seconds="${4:-0}"
    printf 'CONNECT {"verbose":false,"pedantic":false,"headers":true,"name":"cluster-nats.sh"}\r\nSUB %s 1\r\nPING\r\n' \
      "$subject" >&3
    end=$((SECONDS + seconds))
    while [ "$seconds" = 0 ] || [ "$SECONDS" -lt "$end" ]; do
      IFS= read -r -t 1 line <&3 || continue
      line="${line%$'\r'}"
      case "$line" in
        PING) printf 'PONG\r\n' >&3 ;;
        PONG|+OK|"") ;;
        -ERR*) echo "$line" >&2; exit 1 ;;
        MSG*|HMSG*)
          read -r -a f <<<"$line"
          total="${f[${#f[@]}-1]}"
          hlen=0
          [ "${f[0]}" = HMSG ] && hlen="${f[${#f[@]}-2]}"
          IFS= read -r -N "$((total + 2))" data <&3
          echo "--- ${f[1]}"
          if [ "$hlen" -gt 0 ]; then
            printf '%s' "${data:0:hlen}" | tr -d '\r' | grep -v -e '^NATS/1.0' -e '^$' || true
          fi
          printf '%s\n' "${data:hlen:total-hlen}"
          ;;
      esac
    done
    ;;
  *) usage ;;
esac
