#!/usr/bin/env bash
# Records, beside an EIF's PCRs, the build inputs that are not in this
# repository but are measured with it: the nitro-cli blobs (kernel, its
# command line, init, nsm.ko: PCR0 and PCR1), the linuxkit binary that packs
# both ramdisks (PCR0, PCR1, PCR2), the Docker image and the `env` and `cmd`
# files nitro-cli writes from its configuration (PCR0, PCR2), and the tool
# versions. Two builds agree on PCR0-2 only if these agree too.
#
# Run on the build machine right after `nitro-cli build-enclave`:
#
#   deploy/record-build-inputs.sh kluis-enclave:v1 kluis-v1.eif > kluis-v1.build-inputs.txt
#
# NITRO_CLI_BLOBS names the blob directory if it is not the default
# (/usr/share/nitro_enclaves/blobs), as for nitro-cli itself.
set -euo pipefail

if [ "$#" -ne 2 ]; then
    echo "usage: $0 DOCKER_IMAGE EIF" >&2
    exit 2
fi
image="$1"
eif="$2"
blobs="${NITRO_CLI_BLOBS:-/usr/share/nitro_enclaves/blobs}"
[ -f "$eif" ] || { echo "$0: no EIF at $eif" >&2; exit 1; }
[ -d "$blobs" ] || { echo "$0: no nitro-cli blob directory at $blobs (set NITRO_CLI_BLOBS)" >&2; exit 1; }

echo "# Kluis enclave build inputs"
echo "recorded: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -srm)"
if git rev-parse HEAD >/dev/null 2>&1; then
    echo "commit: $(git rev-parse HEAD)$(git diff --quiet HEAD -- 2>/dev/null || echo ' (with uncommitted changes)')"
fi
echo "nitro-cli: $(nitro-cli --version 2>&1)"
if command -v rpm >/dev/null 2>&1 && rpm -q aws-nitro-enclaves-cli >/dev/null 2>&1; then
    echo "nitro-cli package: $(rpm -q aws-nitro-enclaves-cli)"
elif command -v dpkg-query >/dev/null 2>&1 && dpkg-query -W aws-nitro-enclaves-cli >/dev/null 2>&1; then
    echo "nitro-cli package: $(dpkg-query -W -f='${Package} ${Version}' aws-nitro-enclaves-cli)"
fi
echo "docker: $(docker version --format 'server {{.Server.Version}} (API {{.Server.APIVersion}}), client {{.Client.Version}}')"
if [ -x "$blobs/linuxkit" ]; then
    echo "linuxkit: $("$blobs/linuxkit" version 2>&1 | head -n 1)"
fi

echo
echo "## nitro-cli blobs ($blobs), SHA-384"
find "$blobs" -maxdepth 1 -type f -print0 | sort -z | xargs -0 sha384sum

echo
echo "## Docker image $image"
docker image inspect --format 'id: {{.Id}}
repo digests: {{json .RepoDigests}}
env (nitro-cli writes it to /env, measured in PCR2): {{json .Config.Env}}
entrypoint: {{json .Config.Entrypoint}}
cmd: {{json .Config.Cmd}}' "$image"

echo
echo "## EIF $eif"
echo "sha384: $(sha384sum "$eif" | cut -d' ' -f1)"
# describe-eif is in newer nitro-cli releases only; the PCRs printed by
# build-enclave (kept as *.pcrs.json) are the record otherwise.
described="$(mktemp)"
trap 'rm -f "$described"' EXIT
if nitro-cli describe-eif --eif-path "$eif" >"$described" 2>/dev/null; then
    echo "measurements (nitro-cli describe-eif):"
    cat "$described"
else
    echo "measurements: see the build-enclave output (nitro-cli describe-eif is not available)"
fi
