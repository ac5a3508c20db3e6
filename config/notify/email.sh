#!/bin/sh
# keyrotd notification target: email through the local mail transfer agent (sendmail interface).
#
#   [notify.email]
#   kind = "command"
#   command = ["/etc/keyrotd/notify/email.sh", "payments-oncall@example.com"]
#   env = { SENDMAIL = "/usr/sbin/sendmail" }        # optional; this is the default
#
# keyrotd runs it without a shell, in a cleared environment (PATH, LANG, the target's `env`), with the
# notice as JSON on stdin and its main fields as variables: KEYROTD_EVENT, KEYROTD_KEY, KEYROTD_TEXT,
# and when they apply KEYROTD_OWNER, KEYROTD_OWNER_CONTACT, KEYROTD_ROTATION_ID, KEYROTD_OUTCOME. The
# notice never holds a secret. Exit 0 means delivered; anything else is retried (the target's
# `retries`), then counted as failed.
set -eu

to=${1:?usage: email.sh RECIPIENT}
sendmail=${SENDMAIL:-/usr/sbin/sendmail}
notice=$(cat)

{
  printf 'To: %s\n' "$to"
  printf 'Subject: [keyrotd] %s: %s\n' "${KEYROTD_EVENT:-notice}" "${KEYROTD_KEY:-?}"
  printf 'Content-Type: text/plain; charset=utf-8\n'
  printf '\n%s\n\n' "${KEYROTD_TEXT:-}"
  printf 'The notice as keyrotd sent it:\n%s\n' "$notice"
} | "$sendmail" -t -oi
