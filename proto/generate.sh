#!/usr/bin/env bash
# Regenerates migrate/proto/ from proto/migration.proto. The generated code is
# committed; tests/test_protocol.py regenerates into a temp folder and diffs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../migrate/proto}
python=${PYTHON:-python3}
"$python" -m grpc_tools.protoc -I"$here" --python_out="$out" --grpc_python_out="$out" "$here/migration.proto"
# grpc_tools emits a top-level import; make it relative to the package.
sed -i 's/^import migration_pb2 as migration__pb2$/from migrate.proto import migration_pb2 as migration__pb2/' "$out/migration_pb2_grpc.py"
