#!/usr/bin/env bash
# Runs the oneDNN convolutions of x2jax/models/csrc/onednn_conv.cc over the shape grid of
# tests/test_onednn_grid.py under memory checkers, without JAX: a native driver includes the
# .cc, calls its forward / input-gradient / weight-gradient functions on heap buffers of
# exactly the output's size and checks each result against a float64 direct sum.
#
#   scripts/check_onednn_memory.sh [valgrind|asan|malloc ...]   (default: all three)
#
# valgrind: memcheck, which also sees oneDNN's JIT code (valgrind reports no AVX-512, so
#           oneDNN runs its AVX2 kernels); slow, so it takes the cases of at most
#           $VALGRIND_MAX_MACS multiply-adds per convolution (default 3e7: all but 3).
# asan:     the driver and .cc built with -fsanitize=address: checks the .cc's own code
#           (libdnnl is not instrumented; its stray writes show only as crashes).
# malloc:   glibc's checking allocator (libc_malloc_debug, MALLOC_CHECK_=3, MALLOC_PERTURB_)
#           with oneDNN at AVX-512, AVX2 and SSE4.1 (ONEDNN_MAX_CPU_ISA).
# Each run prints one line per case and exits non-zero on a checker error, a crash or a
# wrong value. RAW_ONEDNN=1 calls oneDNN's weight gradient directly, without the strided 1x1
# workaround of the .cc, to see whether the installed oneDNN still has that bug.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CXX=${CXX:-g++}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

read -r FFI_INC DNNL_INC DNNL_LIB < <("$PY" - <<'EOF'
import jax
from x2jax.models import onednn_conv
inc, lib = onednn_conv._find_onednn()
print(jax.ffi.include_dir(), inc, lib)
EOF
)
# B H W C O K S PT PB PL PR, one case a line, of at most $1 multiply-adds per convolution
cases() {
  "$PY" - "$1" <<'EOF'
import sys
sys.path.insert(0, "tests")
from test_onednn_grid import CASES, flops
for c in CASES:
    if flops(c) <= float(sys.argv[1]):
        b, h, w, ci, co, k, s, ((pt, pb), (pl, pr)) = c
        print(b, h, w, ci, co, k, s, pt, pb, pl, pr)
EOF
}

cat > "$work/driver.cc" <<'EOF'
#include "onednn_conv.cc"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

float next_value(uint64_t& state) {  // deterministic values in [-1, 1)
  state = state * 6364136223846793005ULL + 1442695040888963407ULL;
  return static_cast<float>((state >> 40) & 0xFFFFFF) / 8388608.0f - 1.0f;
}

double rel_err(const std::vector<float>& a, const std::vector<double>& ref) {
  double err = 0, scale = 1e-30;
  for (size_t i = 0; i < ref.size(); ++i) {
    err = std::fmax(err, std::fabs(a[i] - ref[i]));
    scale = std::fmax(scale, std::fabs(ref[i]));
  }
  return err / scale;
}

}  // namespace

int main() {
  const bool raw = std::getenv("RAW_ONEDNN") && std::string(std::getenv("RAW_ONEDNN")) == "1";
  long b, h, w, c, o, k, s, pt, pb, pl, pr;
  int bad = 0, n = 0;
  while (std::scanf("%ld %ld %ld %ld %ld %ld %ld %ld %ld %ld %ld", &b, &h, &w, &c, &o, &k, &s,
                    &pt, &pb, &pl, &pr) == 11) {
    const long oh = (h + pt + pb - k) / s + 1, ow = (w + pl + pr - k) / s + 1;
    Geometry g;
    g.x = {b, c, h, w};
    g.w = {o, c, k, k};
    g.y = {b, o, oh, ow};
    g.strides = {s, s};
    g.pad_l = {pt, pl};
    g.pad_r = {pb, pr};
    uint64_t state = 1 + n;
    std::vector<float> x(b * h * w * c), kern(k * k * c * o), dy(b * oh * ow * o);
    for (auto* v : {&x, &kern, &dy})
      for (auto& e : *v) e = next_value(state);
    // float64 direct sums: NHWC x, HWIO kernel, L = sum(y * dy)
    std::vector<double> y_ref(dy.size()), dx_ref(x.size()), dw_ref(kern.size());
    for (long n_ = 0; n_ < b; ++n_)
      for (long i = 0; i < oh; ++i)
        for (long j = 0; j < ow; ++j)
          for (long u = 0; u < k; ++u)
            for (long v = 0; v < k; ++v) {
              const long hi = i * s + u - pt, wi = j * s + v - pl;
              if (hi < 0 || hi >= h || wi < 0 || wi >= w) continue;
              const float* xp = &x[((n_ * h + hi) * w + wi) * c];
              const float* dyp = &dy[((n_ * oh + i) * ow + j) * o];
              double* yp = &y_ref[((n_ * oh + i) * ow + j) * o];
              double* dxp = &dx_ref[((n_ * h + hi) * w + wi) * c];
              for (long ci = 0; ci < c; ++ci) {
                const float* kp = &kern[((u * k + v) * c + ci) * o];
                double* dwp = &dw_ref[((u * k + v) * c + ci) * o];
                for (long co = 0; co < o; ++co) {
                  yp[co] += double(xp[ci]) * kp[co];
                  dxp[ci] += double(dyp[co]) * kp[co];
                  dwp[co] += double(xp[ci]) * dyp[co];
                }
              }
            }
    // outputs of exactly their size, as XLA's: an overrun leaves the buffer
    std::vector<float> y(dy.size()), dx(x.size()), dw(kern.size());
    std::printf("B%ld H%ld W%ld C%ld O%ld k%ld s%ld pad(%ld,%ld,%ld,%ld): ", b, h, w, c, o, k,
                s, pt, pb, pl, pr);
    std::fflush(stdout);  // a crash leaves the case named
    std::string what = "ok";
    try {
      std::lock_guard<std::mutex> lock(call_mutex());
      conv_forward(g, x.data(), kern.data(), y.data());
      conv_input_grad(g, dy.data(), kern.data(), dx.data());
      if (raw)
        weight_grad_direct(g, x.data(), dy.data(), dw.data());
      else
        conv_weight_grad(g, x.data(), dy.data(), dw.data());
      const double ey = rel_err(y, y_ref), edx = rel_err(dx, dx_ref), edw = rel_err(dw, dw_ref);
      if (ey > 1e-5 || edx > 1e-5 || edw > 1e-5) {
        char msg[160];
        std::snprintf(msg, sizeof msg, "WRONG y %.2g dx %.2g dW %.2g", ey, edx, edw);
        what = msg;
      }
    } catch (const std::exception& e) {
      what = std::string("ERROR ") + e.what();
    }
    if (what != "ok") ++bad;
    std::printf("%s\n", what.c_str());
    std::fflush(stdout);
    ++n;
  }
  std::printf("%d cases, %d failed\n", n, bad);
  return bad ? 2 : 0;
}
EOF

build() {  # build OUT EXTRA_FLAGS...
  local out=$1
  shift
  "$CXX" -std=c++17 -g -O1 -fno-omit-frame-pointer -w "$@" -I x2jax/models/csrc -I "$FFI_INC" \
    -I "$DNNL_INC" "$work/driver.cc" -L "$DNNL_LIB" -ldnnl "-Wl,-rpath,$DNNL_LIB" -o "$out"
}

status=0
run() {  # run NAME MAX_MACS COMMAND...
  local name=$1 set=$2
  shift 2
  echo "== $name"
  if cases "$set" | "$@" >"$work/$name.log" 2>&1; then
    tail -n 1 "$work/$name.log"
  else
    echo "FAILED (exit $?), the first report:"
    grep -av ': ok$' "$work/$name.log" | head -n 30
    status=1
  fi
}

checkers=("$@")
[ ${#checkers[@]} -gt 0 ] || checkers=(valgrind asan malloc)
for checker in "${checkers[@]}"; do
  case $checker in
    valgrind)
      if ! command -v valgrind >/dev/null; then
        echo "== valgrind: not installed (apt-get install valgrind)"
        status=1
        continue
      fi
      build "$work/driver" -O2
      # smaller superblocks: oneDNN's unrolled JIT reorders exhaust VEX's temporary storage
      run valgrind "${VALGRIND_MAX_MACS:-3e7}" \
        valgrind -q --error-exitcode=3 --vex-guest-max-insns=25 "$work/driver";;
    asan)
      build "$work/driver_asan" -fsanitize=address
      run asan inf env ASAN_OPTIONS=detect_leaks=0:abort_on_error=0 "$work/driver_asan";;
    malloc)
      build "$work/driver" -O2
      debug=$(ldconfig -p | awk '/libc_malloc_debug.so/ {print $NF; exit}')
      for isa in ALL AVX2 SSE41; do
        run "malloc-$isa" inf env ${debug:+LD_PRELOAD=$debug} MALLOC_CHECK_=3 MALLOC_PERTURB_=165 \
          ONEDNN_MAX_CPU_ISA=$isa "$work/driver"
      done;;
    *) echo "unknown checker $checker (valgrind, asan, malloc)"; exit 2;;
  esac
done
exit $status
