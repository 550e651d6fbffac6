#!/bin/sh
# Adds an unprivileged user (busybox has no adduser applet here): USER_NAME, USER_ID from env.
set -eu
: "${USER_NAME:?}" "${USER_ID:?}"
home=/home/$USER_NAME
grep -q "^$USER_NAME:" /etc/passwd && exit 0
echo "$USER_NAME:x:$USER_ID:$USER_ID:$USER_NAME:$home:/bin/sh" >> /etc/passwd
echo "$USER_NAME:x:$USER_ID:" >> /etc/group
echo "$USER_NAME:!:19723:0:99999:7:::" >> /etc/shadow
mkdir -p "$home"
chown "$USER_ID:$USER_ID" "$home"
chmod 0750 "$home"
