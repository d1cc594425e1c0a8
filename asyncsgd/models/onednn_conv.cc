// oneDNN convolutions as XLA FFI custom calls (CPU): the forward, the input gradient and the weight
// gradient of an NHWC / HWIO 2-D convolution in float32, for asyncsgd/models/conv.py.
//
// Built on first use by asyncsgd/models/onednn.py (g++, oneDNN's wheel, jaxlib's FFI headers) and
// cached by a hash of this file. Why it exists: XLA's CPU convolutions run at 25-30% of this CPU's
// matrix-product peak where oneDNN's run at 50-60% (docs/measurements.md).
//
// Layouts: activations stay NHWC (oneDNN's "nhwc", no copy); the kernel is HWIO in XLA's memory
// ("hwio") and is reordered into whatever blocked layout oneDNN's chosen implementation wants (a few
// hundred KB at most); the weight gradient is reordered back to HWIO. Primitives are created once per
// shape and kept (creation costs milliseconds). Several XLA threads run convolutions at once (PD-ASGD's
// forward and backward threads, Hogwild's workers), so no scratchpad is shared: every primitive is
// made with a user-managed scratchpad, and each calling thread brings its own (oneDNN's default, a
// library scratchpad shared between primitives, corrupted results and hung a Hogwild run here).
//
// Threads: oneDNN (the gomp build) runs a convolution on an OpenMP team of the calling thread's
// `omp_get_max_threads()`, all cores by default. `AsyncsgdConvSetThreads(n)` makes every later call
// use n threads instead (0: the default again); a trainer that runs several passes at once can then give
// each pass one core rather than splitting every kernel over all of them. OpenMP's thread count is
// per calling thread, so it is set on each call, and a primitive is kept per (kind, shape, threads),
// since oneDNN divides a convolution's work by the thread count when it creates the primitive.

#include <array>
#include <atomic>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = dnnl::memory::format_tag;
using Dt = dnnl::memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One convolution's shapes: input N x H x W x C, kernel KH x KW x C x O, output N x OH x OW x O,
// strides, padding low (PH, PW) and high (PH2, PW2).
using Geometry = std::array<int64_t, 15>;
enum { N, H, W, C, KH, KW, O, OH, OW, SH, SW, PH, PW, PH2, PW2 };

memory::desc Activations(const Geometry& g) { return memory::desc({g[N], g[C], g[H], g[W]}, Dt::f32, Tag::nhwc); }
memory::desc Outputs(const Geometry& g) { return memory::desc({g[N], g[O], g[OH], g[OW]}, Dt::f32, Tag::nhwc); }
memory::desc Kernel(const Geometry& g, Tag tag) { return memory::desc({g[O], g[C], g[KH], g[KW]}, Dt::f32, tag); }

dnnl::primitive_attr OwnScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, Activations(g),
      Kernel(g, Tag::any), Outputs(g), {g[SH], g[SW]}, {g[PH], g[PW]}, {g[PH2], g[PW2]}, OwnScratchpad());
}

enum class Kind { kForward, kInputGrad, kWeightGrad };

// The backward-data or backward-weights descriptor (`Desc`) of the convolution `hint` describes.
template <typename Desc>
Desc BackwardDesc(const Geometry& g, const dnnl::convolution_forward::primitive_desc& hint) {
  return Desc(Engine(), dnnl::algorithm::convolution_direct, Activations(g), Kernel(g, Tag::any), Outputs(g),
              {g[SH], g[SW]}, {g[PH], g[PW]}, {g[PH2], g[PW2]}, hint, OwnScratchpad());
}

// A primitive for one (kind, shape), with the reorder between XLA's HWIO kernel and the layout the
// primitive wants (an empty handle when they are the same).
struct Prepared {
  dnnl::primitive primitive;
  memory::desc scratchpad_desc;
  memory::desc kernel_desc;
  dnnl::reorder kernel_reorder;
  memory::desc reorder_scratchpad_desc;
};

Prepared Prepare(Kind kind, const Geometry& g) {
  Prepared p;
  const memory::desc hwio = Kernel(g, Tag::hwio);
  auto hint = ForwardDesc(g);
  if (kind == Kind::kForward) {
    p.primitive = dnnl::convolution_forward(hint);
    p.scratchpad_desc = hint.scratchpad_desc();
    p.kernel_desc = hint.weights_desc();
  } else if (kind == Kind::kInputGrad) {
    auto pd = BackwardDesc<dnnl::convolution_backward_data::primitive_desc>(g, hint);
    p.primitive = dnnl::convolution_backward_data(pd);
    p.scratchpad_desc = pd.scratchpad_desc();
    p.kernel_desc = pd.weights_desc();
  } else {
    auto pd = BackwardDesc<dnnl::convolution_backward_weights::primitive_desc>(g, hint);
    p.primitive = dnnl::convolution_backward_weights(pd);
    p.scratchpad_desc = pd.scratchpad_desc();
    p.kernel_desc = pd.diff_weights_desc();
  }
  if (p.kernel_desc != hwio) {
    auto pd = kind == Kind::kWeightGrad
        ? dnnl::reorder::primitive_desc(Engine(), p.kernel_desc, Engine(), hwio, OwnScratchpad())
        : dnnl::reorder::primitive_desc(Engine(), hwio, Engine(), p.kernel_desc, OwnScratchpad());
    p.kernel_reorder = dnnl::reorder(pd);
    p.reorder_scratchpad_desc = pd.scratchpad_desc();
  }
  return p;
}

// OpenMP's thread count when the library was loaded (OMP_NUM_THREADS, else the cores), and the one
// set by AsyncsgdConvSetThreads (0: that default).
const int kDefaultThreads = omp_get_max_threads();
std::atomic<int> requested_threads{0};

// This call's thread count, made the calling thread's OpenMP setting.
int UseThreads() {
  const int requested = requested_threads.load(std::memory_order_relaxed);
  const int threads = requested > 0 ? requested : kDefaultThreads;
  if (omp_get_max_threads() != threads) omp_set_num_threads(threads);
  return threads;
}

const Prepared& Cached(Kind kind, const Geometry& g, int threads) {
  static std::mutex mutex;
  static std::map<std::tuple<Kind, Geometry, int>, std::unique_ptr<Prepared>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = cache[{kind, g, threads}];
  if (!slot) slot = std::make_unique<Prepared>(Prepare(kind, g));
  return *slot;  // entries are never erased: the reference stays valid after the lock is released
}

Geometry Shapes(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w, ffi::Span<const int64_t> y,
                int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t ph2, int64_t pw2) {
  return {x[0], x[1], x[2], x[3], w[0], w[1], w[3], y[1], y[2], sh, sw, ph, pw, ph2, pw2};
}

// Memory for `desc` in this thread's buffer number `slot` (0: the primitive's scratchpad, 1: the kernel
// in the primitive's layout), grown when a primitive needs more. A thread runs one convolution at a time,
// so its buffers are never used twice at once, and the hot path allocates nothing once they have grown.
memory ThreadBuffer(int slot, const memory::desc& desc) {
  thread_local std::array<std::unique_ptr<char[]>, 2> buffers;
  thread_local std::array<size_t, 2> capacities{};
  const size_t size = desc.get_size() + 64;
  if (size > capacities[slot]) {
    buffers[slot].reset(new char[size]);
    capacities[slot] = size;
  }
  // oneDNN wants 64-byte aligned buffers
  void* aligned = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(buffers[slot].get()) + 63) & ~uintptr_t{63});
  return memory(desc, Engine(), aligned);
}

// Runs the prepared primitive on XLA's buffers; `activations` is the input (or its gradient),
// `outputs` the output (or its gradient), `kernel` the HWIO kernel (or its gradient).
ffi::Error Run(Kind kind, const Geometry& g, void* activations, void* kernel, void* outputs) {
  try {
    const Prepared& p = Cached(kind, g, UseThreads());
    thread_local dnnl::stream stream(Engine());
    const bool reorder = static_cast<bool>(p.kernel_reorder);
    memory act(Activations(g), Engine(), activations);
    memory out(Outputs(g), Engine(), outputs);
    memory hwio(Kernel(g, Tag::hwio), Engine(), kernel);
    memory ker = reorder ? ThreadBuffer(1, p.kernel_desc) : hwio;
    auto reorder_kernel = [&](memory& from, memory& to) {  // its scratchpad (usually none) is its own
      memory scratch(p.reorder_scratchpad_desc, Engine());
      p.kernel_reorder.execute(stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}, {DNNL_ARG_SCRATCHPAD, scratch}});
    };
    memory scratch = ThreadBuffer(0, p.scratchpad_desc);
    if (kind == Kind::kForward) {
      if (reorder) reorder_kernel(hwio, ker);
      p.primitive.execute(stream, {{DNNL_ARG_SRC, act}, {DNNL_ARG_WEIGHTS, ker}, {DNNL_ARG_DST, out},
                                   {DNNL_ARG_SCRATCHPAD, scratch}});
    } else if (kind == Kind::kInputGrad) {
      if (reorder) reorder_kernel(hwio, ker);
      p.primitive.execute(stream, {{DNNL_ARG_DIFF_DST, out}, {DNNL_ARG_WEIGHTS, ker}, {DNNL_ARG_DIFF_SRC, act},
                                   {DNNL_ARG_SCRATCHPAD, scratch}});
    } else {
      p.primitive.execute(stream, {{DNNL_ARG_SRC, act}, {DNNL_ARG_DIFF_DST, out}, {DNNL_ARG_DIFF_WEIGHTS, ker},
                                   {DNNL_ARG_SCRATCHPAD, scratch}});
      if (reorder) reorder_kernel(ker, hwio);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution: ") + e.what());
  } catch (const std::exception& e) {  // e.g. no memory for a scratchpad: an error, not a terminate
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, std::string("oneDNN convolution: ") + e.what());
  }
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32, 4>;
using F32Out = ffi::ResultBuffer<ffi::F32, 4>;

}  // namespace

// y = conv(x, w)
ffi::Error ForwardImpl(F32 x, F32 w, F32Out y, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t ph2,
                       int64_t pw2) {
  Geometry g = Shapes(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, ph, pw, ph2, pw2);
  return Run(Kind::kForward, g, x.untyped_data(), w.untyped_data(), y->untyped_data());
}

// dx = d conv / d x applied to dy
ffi::Error InputGradImpl(F32 dy, F32 w, F32Out dx, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t ph2,
                         int64_t pw2) {
  Geometry g = Shapes(dx->dimensions(), w.dimensions(), dy.dimensions(), sh, sw, ph, pw, ph2, pw2);
  return Run(Kind::kInputGrad, g, dx->untyped_data(), w.untyped_data(), dy.untyped_data());
}

// dw = d conv / d w applied to dy
ffi::Error WeightGradImpl(F32 x, F32 dy, F32Out dw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t ph2,
                          int64_t pw2) {
  Geometry g = Shapes(x.dimensions(), dw->dimensions(), dy.dimensions(), sh, sw, ph, pw, ph2, pw2);
  return Run(Kind::kWeightGrad, g, x.untyped_data(), dw->untyped_data(), dy.untyped_data());
}

// The thread count of every later convolution (0: OpenMP's default); the one in use.
extern "C" void AsyncsgdConvSetThreads(int threads) { requested_threads.store(threads > 0 ? threads : 0); }
extern "C" int AsyncsgdConvRequestedThreads() { return requested_threads.load(); }
extern "C" int AsyncsgdConvThreads() {
  const int requested = requested_threads.load();
  return requested > 0 ? requested : kDefaultThreads;
}

#define ASYNCSGD_CONV_ATTRS                                                                        \
  .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("ph").Attr<int64_t>("pw").Attr<int64_t>("ph2") \
      .Attr<int64_t>("pw2")

XLA_FFI_DEFINE_HANDLER_SYMBOL(AsyncsgdConvForward, ForwardImpl,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>()
                                  ASYNCSGD_CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(AsyncsgdConvInputGrad, InputGradImpl,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>()
                                  ASYNCSGD_CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(AsyncsgdConvWeightGrad, WeightGradImpl,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>()
                                  ASYNCSGD_CONV_ATTRS);
