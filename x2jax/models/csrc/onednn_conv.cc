// oneDNN convolutions as XLA FFI custom calls (CPU): forward, input gradient
// and weight gradient of a 2-D float32 convolution, activations NHWC, kernel
// HWIO, no groups, no dilation.
//
// Built on first use by x2jax/models/onednn_conv.py (g++ against the headers
// jaxlib ships and the oneDNN of the `onednn` extra). Each call looks up (or
// creates once) the oneDNN primitives for its shapes; the kernel is reordered
// into the layout oneDNN picks for this CPU ("any") and the weight gradient
// back into HWIO. Calls are serialised: every primitive already uses all
// OpenMP threads, and two at once would only oversubscribe the cores.
//
// Strided 1x1 weight gradients without padding run as the stride-1 weight
// gradient of the subsampled input x[:, ::sh, ::sw, :]. oneDNN 3.2 runs them in
// its jit 1x1 backward-weights kernels (jit_1x1:avx512_core, jit_1x1:avx2) and,
// when H = OH*sh and W = OW*sw, first "reduce them to unit stride": each thread
// copies the strided NHWC pixels of a spatial block into its part of the
// scratchpad, is * ic floats (is = OH*OW), but puts the block that starts at
// pixel sp at offset sp * ic_block instead of sp * ic (execute_backward_weights
// in src/cpu/x64/jit_avx512_common_1x1_convolution.cpp and
// jit_avx2_1x1_convolution.cpp). With ic < ic_block (16 floats on AVX-512, 8 on
// AVX2) the copies run into the next thread's part and past the end of the
// scratchpad (valgrind: "Invalid write ... 0 bytes after a block" allocated by
// create_scratchpad), corrupting the heap and oneDNN's reduction barrier:
// SIGSEGV, free(): invalid pointer, hangs or a wrong dW. The stride-1 kernels
// read the source in place and are not affected.
//
// The conv functions below take plain pointers so that a native driver
// (scripts/check_onednn_memory.sh) can run them under a memory checker.

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

struct Geometry {
  memory::dims x, w, y;  // logical oneDNN dims: x {N,C,H,W}, w {O,I,KH,KW}, y {N,O,OH,OW}
  memory::dims strides, pad_l, pad_r;

  std::string key() const {
    std::ostringstream s;
    for (const auto* d : {&x, &w, &y, &strides, &pad_l, &pad_r}) {
      for (auto v : *d) s << v << ',';
      s << ';';
    }
    return s.str();
  }
};

struct Primitives {
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_forward fwd;
  dnnl::reorder fwd_w_reorder;  // HWIO -> fwd_pd.weights_desc()
  bool fwd_w_plain = false;
  // Backward ones, created on first use.
  bool has_bwd_data = false;
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_data bwd_data;
  dnnl::reorder bwd_data_w_reorder;
  bool bwd_data_w_plain = false;
  bool has_bwd_weights = false;
  dnnl::convolution_backward_weights::primitive_desc bwd_w_pd;
  dnnl::convolution_backward_weights bwd_weights;
  dnnl::reorder bwd_w_reorder;  // bwd_w_pd.diff_weights_desc() -> HWIO
  bool bwd_w_plain = false;
  // Strided 1x1 weight gradient: x[:, ::sh, ::sw, :] (NHWC), allocated on first use.
  std::vector<float> x_sub;
};

dnnl::engine& engine() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

std::mutex& call_mutex() {
  static std::mutex m;
  return m;
}

memory::desc act_md(const memory::dims& d) { return memory::desc(d, dt::f32, tag::nhwc); }
memory::desc hwio_md(const memory::dims& d) { return memory::desc(d, dt::f32, tag::hwio); }
memory::desc any_md(const memory::dims& d) { return memory::desc(d, dt::f32, tag::any); }

// oneDNN takes non-const handles; inputs are only read.
void* handle(const float* p) { return const_cast<float*>(p); }

Primitives& primitives(const Geometry& g) {
  static std::unordered_map<std::string, std::unique_ptr<Primitives>> cache;
  auto& slot = cache[g.key()];
  if (!slot) {
    auto p = std::make_unique<Primitives>();
    p->fwd_pd = dnnl::convolution_forward::primitive_desc(
        engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
        act_md(g.x), any_md(g.w), act_md(g.y), g.strides, g.pad_l, g.pad_r);
    p->fwd = dnnl::convolution_forward(p->fwd_pd);
    p->fwd_w_plain = p->fwd_pd.weights_desc() == hwio_md(g.w);
    if (!p->fwd_w_plain)
      p->fwd_w_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(
          engine(), hwio_md(g.w), engine(), p->fwd_pd.weights_desc()));
    slot = std::move(p);
  }
  return *slot;
}

// Kernel as the primitive wants it: the user's HWIO buffer or a reordered copy.
memory weights_for(dnnl::stream& s, bool plain, dnnl::reorder& r, const memory::desc& want,
                   const memory::dims& w_dims, const float* w) {
  memory user(hwio_md(w_dims), engine(), handle(w));
  if (plain) return user;
  memory m(want, engine());
  r.execute(s, user, m);
  return m;
}

// The three convolutions on plain NHWC / HWIO buffers of the shapes in g. The
// caller holds call_mutex() (the primitive cache is not thread-safe).

void conv_forward(const Geometry& g, const float* x, const float* w, float* y) {
  Primitives& p = primitives(g);
  dnnl::stream s(engine());
  memory wm = weights_for(s, p.fwd_w_plain, p.fwd_w_reorder, p.fwd_pd.weights_desc(), g.w, w);
  memory xm(act_md(g.x), engine(), handle(x));
  memory ym(act_md(g.y), engine(), y);
  p.fwd.execute(s, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DST, ym}});
  s.wait();
}

void conv_input_grad(const Geometry& g, const float* dy, const float* w, float* dx) {
  Primitives& p = primitives(g);
  if (!p.has_bwd_data) {
    p.bwd_data_pd = dnnl::convolution_backward_data::primitive_desc(
        engine(), dnnl::algorithm::convolution_direct, act_md(g.x), any_md(g.w), act_md(g.y),
        g.strides, g.pad_l, g.pad_r, p.fwd_pd);
    p.bwd_data = dnnl::convolution_backward_data(p.bwd_data_pd);
    p.bwd_data_w_plain = p.bwd_data_pd.weights_desc() == hwio_md(g.w);
    if (!p.bwd_data_w_plain)
      p.bwd_data_w_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(
          engine(), hwio_md(g.w), engine(), p.bwd_data_pd.weights_desc()));
    p.has_bwd_data = true;
  }
  dnnl::stream s(engine());
  memory wm = weights_for(s, p.bwd_data_w_plain, p.bwd_data_w_reorder,
                          p.bwd_data_pd.weights_desc(), g.w, w);
  memory dym(act_md(g.y), engine(), handle(dy));
  memory dxm(act_md(g.x), engine(), dx);
  p.bwd_data.execute(s, {{DNNL_ARG_DIFF_DST, dym}, {DNNL_ARG_WEIGHTS, wm},
                         {DNNL_ARG_DIFF_SRC, dxm}});
  s.wait();
}

void weight_grad_direct(const Geometry& g, const float* x, const float* dy, float* dw) {
  Primitives& p = primitives(g);
  if (!p.has_bwd_weights) {
    p.bwd_w_pd = dnnl::convolution_backward_weights::primitive_desc(
        engine(), dnnl::algorithm::convolution_direct, act_md(g.x), any_md(g.w), act_md(g.y),
        g.strides, g.pad_l, g.pad_r, p.fwd_pd);
    p.bwd_weights = dnnl::convolution_backward_weights(p.bwd_w_pd);
    p.bwd_w_plain = p.bwd_w_pd.diff_weights_desc() == hwio_md(g.w);
    if (!p.bwd_w_plain)
      p.bwd_w_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(
          engine(), p.bwd_w_pd.diff_weights_desc(), engine(), hwio_md(g.w)));
    p.has_bwd_weights = true;
  }
  dnnl::stream s(engine());
  memory xm(act_md(g.x), engine(), handle(x));
  memory dym(act_md(g.y), engine(), handle(dy));
  memory user(hwio_md(g.w), engine(), dw);
  memory dwm = p.bwd_w_plain ? user : memory(p.bwd_w_pd.diff_weights_desc(), engine());
  p.bwd_weights.execute(s, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_DST, dym},
                            {DNNL_ARG_DIFF_WEIGHTS, dwm}});
  if (!p.bwd_w_plain) p.bwd_w_reorder.execute(s, dwm, user);
  s.wait();
}

// A 1x1 kernel with a stride and no padding: the case oneDNN's jit 1x1 kernels
// "reduce to unit stride" (see the top of this file).
bool strided_1x1(const Geometry& g) {
  bool unpadded = true;
  for (auto v : g.pad_l) unpadded = unpadded && v == 0;
  for (auto v : g.pad_r) unpadded = unpadded && v == 0;
  return g.w[2] == 1 && g.w[3] == 1 && (g.strides[0] != 1 || g.strides[1] != 1) && unpadded;
}

void conv_weight_grad(const Geometry& g, const float* x, const float* dy, float* dw) {
  if (!strided_1x1(g)) return weight_grad_direct(g, x, dy, dw);
  // dW[0, 0, c, o] = sum_{b,i,j} x[b, i*sh, j*sw, c] dy[b, i, j, o]: the stride-1
  // weight gradient of x_sub[b, i, j, c] = x[b, i*sh, j*sw, c].
  const memory::dim n = g.x[0], c = g.x[1], h = g.x[2], w = g.x[3];
  const memory::dim oh = g.y[2], ow = g.y[3], sh = g.strides[0], sw = g.strides[1];
  Geometry sub = g;
  sub.x = {n, c, oh, ow};
  sub.strides = {1, 1};
  std::vector<float>& x_sub = primitives(g).x_sub;
  x_sub.resize(n * oh * ow * c);
  for (memory::dim b = 0; b < n; ++b)
    for (memory::dim i = 0; i < oh; ++i)
      for (memory::dim j = 0; j < ow; ++j)
        std::copy_n(x + ((b * h + i * sh) * w + j * sw) * c, c,
                    x_sub.data() + ((b * oh + i) * ow + j) * c);
  weight_grad_direct(sub, x_sub.data(), dy, dw);
}

// x2jax passes NHWC / HWIO buffers; oneDNN's logical dims are NCHW / OIHW.
Geometry geometry(ffi::Span<const int64_t> x_nhwc, ffi::Span<const int64_t> w_hwio,
                  ffi::Span<const int64_t> y_nhwc, ffi::Span<const int64_t> strides,
                  ffi::Span<const int64_t> padding) {
  Geometry g;
  g.x = {x_nhwc[0], x_nhwc[3], x_nhwc[1], x_nhwc[2]};
  g.w = {w_hwio[3], w_hwio[2], w_hwio[0], w_hwio[1]};
  g.y = {y_nhwc[0], y_nhwc[3], y_nhwc[1], y_nhwc[2]};
  g.strides = {strides[0], strides[1]};
  g.pad_l = {padding[0], padding[2]};
  g.pad_r = {padding[1], padding[3]};
  return g;
}

ffi::Error check_args(std::initializer_list<size_t> ranks, ffi::Span<const int64_t> strides,
                      ffi::Span<const int64_t> padding) {
  for (size_t r : ranks)
    if (r != 4) return ffi::Error::InvalidArgument("x2jax onednn conv: operands must be rank 4");
  if (strides.size() != 2 || padding.size() != 4)
    return ffi::Error::InvalidArgument("x2jax onednn conv: strides must have 2 and padding 4 entries");
  return ffi::Error::Success();
}

template <typename F>
ffi::Error guarded(F&& body) {
  try {
    std::lock_guard<std::mutex> lock(call_mutex());
    body();
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("x2jax onednn conv: oneDNN error: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("x2jax onednn conv: ") + e.what());
  }
}

ffi::Error ConvForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, ffi::Span<const int64_t> strides,
                       ffi::Span<const int64_t> padding) {
  auto e = check_args({x.dimensions().size(), w.dimensions().size(), y->dimensions().size()},
                      strides, padding);
  if (e.failure()) return e;
  return guarded([&] {
    conv_forward(geometry(x.dimensions(), w.dimensions(), y->dimensions(), strides, padding),
                 x.typed_data(), w.typed_data(), y->typed_data());
  });
}

ffi::Error ConvInputGrad(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                         ffi::ResultBuffer<ffi::F32> dx, ffi::Span<const int64_t> strides,
                         ffi::Span<const int64_t> padding) {
  auto e = check_args({dy.dimensions().size(), w.dimensions().size(), dx->dimensions().size()},
                      strides, padding);
  if (e.failure()) return e;
  return guarded([&] {
    conv_input_grad(geometry(dx->dimensions(), w.dimensions(), dy.dimensions(), strides, padding),
                    dy.typed_data(), w.typed_data(), dx->typed_data());
  });
}

ffi::Error ConvWeightGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dw, ffi::Span<const int64_t> strides,
                          ffi::Span<const int64_t> padding) {
  auto e = check_args({x.dimensions().size(), dy.dimensions().size(), dw->dimensions().size()},
                      strides, padding);
  if (e.failure()) return e;
  return guarded([&] {
    conv_weight_grad(geometry(x.dimensions(), dw->dimensions(), dy.dimensions(), strides, padding),
                     x.typed_data(), dy.typed_data(), dw->typed_data());
  });
}

}  // namespace

// All three take two float32 buffers, return one and read the same attributes.
#define X2JAX_CONV_BINDING                          \
  ffi::Ffi::Bind()                                  \
      .Arg<ffi::Buffer<ffi::F32>>()                 \
      .Arg<ffi::Buffer<ffi::F32>>()                 \
      .Ret<ffi::Buffer<ffi::F32>>()                 \
      .Attr<ffi::Span<const int64_t>>("strides")    \
      .Attr<ffi::Span<const int64_t>>("padding")

XLA_FFI_DEFINE_HANDLER_SYMBOL(x2jax_onednn_conv_forward, ConvForward, X2JAX_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(x2jax_onednn_conv_input_grad, ConvInputGrad, X2JAX_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(x2jax_onednn_conv_weight_grad, ConvWeightGrad, X2JAX_CONV_BINDING);

extern "C" const char* x2jax_onednn_version() {
  static std::string v = [] {
    const dnnl_version_t* ver = dnnl_version();
    std::ostringstream s;
    s << ver->major << '.' << ver->minor << '.' << ver->patch << " (" << ver->cpu_runtime << ")";
    return s.str();
  }();
  return v.c_str();
}
