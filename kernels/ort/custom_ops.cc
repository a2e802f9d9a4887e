// The ONNX Runtime custom-op layer: `RegisterCustomOps`, called by ONNX Runtime when a session
// loads this library (SessionOptions.register_custom_ops_library), adds the `ai.sdrt` domain.
//
// Written against the C API only (third_party/onnxruntime/include/onnxruntime_c_api.h, API 21);
// newer runtimes serve older API versions, so one build works with every ONNX Runtime >= 1.21.
//
// Ops (domain ai.sdrt, version 1):
//   GroupNorm(X, gamma, beta) -> Y   attributes groups (int), epsilon (float, 1e-5), activation
//                                    (int: 0 none, 1 SiLU), channels_last (int: 0 NCHW, 1 NHWC).
//                                    CPU execution provider: float32, parallel over (batch item,
//                                    group) on the session's intra-op threads. CUDA execution
//                                    provider (this file built with SDRT_WITH_CUDA, into
//                                    libsdrt_kernels_cuda): X and Y float32 or float16, gamma and
//                                    beta float32, on the session's compute stream.
//   Attention(Q, K, V) -> Y          attributes num_heads (int), scale (float, 0: 1/sqrt(head
//                                    size)), math (int: 0 bf16 products where the CPU has
//                                    AVX-512 BF16, else float32; 1 float32). Q and Y [B, S,
//                                    heads*d], K and V [B, L, heads*d], float32: softmax(scale *
//                                    q k^T) v per item and head, as com.microsoft.MultiHeadAttention
//                                    without masks or biases. CPU execution provider, parallel
//                                    over (item, head, block of query rows).
//   Conv3x3(X, W, B) -> Y            X [N, C, H, W], W [K, C, 3, 3], B [K], float32: Y [N, K, H, W]
//                                    = Conv(X, W, B) with padding 1, stride 1, no dilation or
//                                    groups, by Winograd's F(4x4, 3x3) (winograd/winograd.h). CPU
//                                    execution provider, each phase parallel on the intra-op threads.
//
// The CUDA build is a separate library so that the CPU one never depends on the CUDA runtime; it
// registers the CPU op too, and a session loads one of the two.
#include <atomic>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "attention/attention.h"
#include "common/api.h"
#include "group_norm/group_norm.h"
#include "onnxruntime_c_api.h"
#include "winograd/winograd.h"
#ifdef SDRT_WITH_CUDA
#include "group_norm/group_norm_cuda.h"
#endif

namespace {

constexpr const char* kDomain = "ai.sdrt";
constexpr uint32_t kApiVersion = 21;  // the header's ORT_API_VERSION: the oldest runtime served
const OrtApi* g_api = nullptr;

// Turns a failing OrtStatus into a C++ exception-free early return
#define SDRT_RETURN_IF_ERROR(expr)         \
  do {                                     \
    OrtStatus* _status = (expr);           \
    if (_status != nullptr) return _status; \
  } while (0)

// An attribute's value, or `fallback` when the node does not set it
void attribute_int(const OrtKernelInfo* info, const char* name, int64_t fallback, int64_t* out) {
  OrtStatus* status = g_api->KernelInfoGetAttribute_int64(info, name, out);
  if (status != nullptr) {
    g_api->ReleaseStatus(status);
    *out = fallback;
  }
}

void attribute_float(const OrtKernelInfo* info, const char* name, float fallback, float* out) {
  OrtStatus* status = g_api->KernelInfoGetAttribute_float(info, name, out);
  if (status != nullptr) {
    g_api->ReleaseStatus(status);
    *out = fallback;
  }
}

OrtStatus* shape_of(const OrtValue* value, std::vector<int64_t>* dims) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  SDRT_RETURN_IF_ERROR(g_api->GetTensorTypeAndShape(value, &info));
  size_t rank = 0;
  OrtStatus* status = g_api->GetDimensionsCount(info, &rank);
  if (status == nullptr) {
    dims->resize(rank);
    status = g_api->GetDimensions(info, dims->data(), rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  return status;
}

// The three inputs of an op (GroupNorm, Attention) and their shapes
OrtStatus* three_inputs(OrtKernelContext* context, const OrtValue* values[3], std::vector<int64_t> dims[3]) {
  for (size_t i = 0; i < 3; ++i) {
    SDRT_RETURN_IF_ERROR(g_api->KernelContext_GetInput(context, i, &values[i]));
    SDRT_RETURN_IF_ERROR(shape_of(values[i], &dims[i]));
  }
  return nullptr;
}

// API 21 has no const accessor; inputs are only read
OrtStatus* input_data(const OrtValue* value, const float** out) {
  void* data = nullptr;
  OrtStatus* status = g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &data);
  *out = static_cast<const float*>(data);
  return status;
}

// -- GroupNorm --------------------------------------------------------------------------------

struct GroupNormKernel {
  int64_t groups = 0;
  float epsilon = 1e-5f;
  bool silu = false;
  bool channels_last = false;
  bool cuda = false;  // the CUDA op: device pointers, the session's stream
};

struct GroupNormJob {
  sdrt::GroupNormShape shape;
  const float *x, *gamma, *beta;
  float* y;
  float eps;
  bool silu;
};

void group_norm_job(void* data, size_t task) {
  const auto* job = static_cast<const GroupNormJob*>(data);
  sdrt::group_norm_task(job->shape, job->x, job->gamma, job->beta, job->y, job->eps, job->silu,
                        static_cast<int64_t>(task));
}

#ifdef SDRT_WITH_CUDA
OrtStatus* group_norm_compute_cuda(const OrtValue* x, const GroupNormJob& job, OrtKernelContext* context) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  SDRT_RETURN_IF_ERROR(g_api->GetTensorTypeAndShape(x, &info));
  OrtStatus* status = g_api->GetTensorElementType(info, &type);
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  if (status != nullptr) return status;
  void* stream = nullptr;
  SDRT_RETURN_IF_ERROR(g_api->KernelContext_GetGPUComputeStream(context, &stream));
  const auto dtype = type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? sdrt::GpuDtype::kFloat16 : sdrt::GpuDtype::kFloat32;
  // job.x / job.y are typed float* for the CPU path; here they are device pointers of `dtype`
  const int rc = sdrt::group_norm_cuda(dtype, job.x, job.gamma, job.beta, job.y, job.shape, job.eps, job.silu, stream);
  if (rc == 0) return nullptr;
  const std::string msg = "ai.sdrt.GroupNorm (CUDA): launch failed, error " + std::to_string(rc);
  return g_api->CreateStatus(ORT_RUNTIME_EXCEPTION, msg.c_str());
}
#else
OrtStatus* group_norm_compute_cuda(const OrtValue*, const GroupNormJob&, OrtKernelContext*) {
  return g_api->CreateStatus(ORT_NOT_IMPLEMENTED, "ai.sdrt.GroupNorm: this library was built without CUDA");
}
#endif

OrtStatus* group_norm_compute(const GroupNormKernel& k, OrtKernelContext* context) {
  const OrtValue* in[3] = {};
  std::vector<int64_t> shapes[3];
  SDRT_RETURN_IF_ERROR(three_inputs(context, in, shapes));
  const OrtValue *x = in[0], *gamma = in[1], *beta = in[2];
  const std::vector<int64_t>&dims = shapes[0], &gdims = shapes[1], &bdims = shapes[2];
  if (dims.size() < 2) return g_api->CreateStatus(ORT_INVALID_ARGUMENT, "ai.sdrt.GroupNorm: X needs rank >= 2");
  sdrt::GroupNormShape s;
  s.n = dims[0];
  s.c = k.channels_last ? dims.back() : dims[1];
  s.hw = 1;
  for (size_t i = 1; i < dims.size(); ++i)
    if (i != (k.channels_last ? dims.size() - 1 : 1)) s.hw *= dims[i];
  s.groups = k.groups;
  s.channels_last = k.channels_last;
  if (!s.valid()) {
    const std::string msg = "ai.sdrt.GroupNorm: " + std::to_string(s.c) + " channels cannot form " +
                            std::to_string(k.groups) + " groups";
    return g_api->CreateStatus(ORT_INVALID_ARGUMENT, msg.c_str());
  }
  if (gdims.size() != 1 || gdims[0] != s.c || bdims.size() != 1 || bdims[0] != s.c)
    return g_api->CreateStatus(ORT_INVALID_ARGUMENT, "ai.sdrt.GroupNorm: gamma and beta must be [channels]");
  OrtValue* y = nullptr;
  SDRT_RETURN_IF_ERROR(g_api->KernelContext_GetOutput(context, 0, dims.data(), dims.size(), &y));
  GroupNormJob job{s, nullptr, nullptr, nullptr, nullptr, k.epsilon, k.silu};
  SDRT_RETURN_IF_ERROR(input_data(x, &job.x));
  SDRT_RETURN_IF_ERROR(input_data(gamma, &job.gamma));
  SDRT_RETURN_IF_ERROR(input_data(beta, &job.beta));
  SDRT_RETURN_IF_ERROR(g_api->GetTensorMutableData(y, reinterpret_cast<void**>(&job.y)));
  if (k.cuda) return group_norm_compute_cuda(x, job, context);
  const int64_t tasks = sdrt::group_norm_tasks(s);
  if (tasks <= 0) return nullptr;
  return g_api->KernelContext_ParallelFor(context, group_norm_job, static_cast<size_t>(tasks), 0, &job);
}

const char* ORT_API_CALL cuda_provider(const OrtCustomOp*);

OrtStatus* ORT_API_CALL group_norm_create(const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info,
                                          void** kernel) {
  auto* k = new GroupNormKernel();
  k->cuda = op->GetExecutionProviderType == cuda_provider;
  int64_t v = 0;
  attribute_int(info, "groups", 0, &k->groups);
  attribute_float(info, "epsilon", 1e-5f, &k->epsilon);
  attribute_int(info, "activation", 0, &v);
  k->silu = v == 1;
  attribute_int(info, "channels_last", 0, &v);
  k->channels_last = v != 0;
  if (k->groups <= 0) {
    delete k;
    return g_api->CreateStatus(ORT_INVALID_ARGUMENT, "ai.sdrt.GroupNorm: attribute 'groups' must be positive");
  }
  *kernel = k;
  return nullptr;
}

OrtStatus* ORT_API_CALL group_norm_compute_v2(void* kernel, OrtKernelContext* context) {
  return group_norm_compute(*static_cast<GroupNormKernel*>(kernel), context);
}

void ORT_API_CALL group_norm_destroy(void* kernel) { delete static_cast<GroupNormKernel*>(kernel); }

// -- Attention ------------------------------------------------------------------------------------

struct AttentionKernel {
  int64_t heads = 0;
  float scale = 0.0f;
  sdrt::AttentionMath math = sdrt::AttentionMath::kAuto;
};

// One call on the intra-op threads; a task that cannot allocate its scratch marks the call failed
// (no exception may cross ONNX Runtime's thread pool)
struct AttentionCall {
  sdrt::AttentionJob* job;
  std::atomic<bool> failed{false};
};

// Runs one task of a phase (AttentionJob::pack_task or run_task) for KernelContext_ParallelFor
template <void (sdrt::AttentionJob::*kTask)(int64_t)>
void attention_task(void* data, size_t task) {
  auto* call = static_cast<AttentionCall*>(data);
  try {
    (call->job->*kTask)(static_cast<int64_t>(task));
  } catch (...) {
    call->failed = true;
  }
}

OrtStatus* attention_compute(const AttentionKernel& k, OrtKernelContext* context) {
  const OrtValue* in[3] = {};
  std::vector<int64_t> shapes[3];
  SDRT_RETURN_IF_ERROR(three_inputs(context, in, shapes));
  const OrtValue *q = in[0], *key = in[1], *value = in[2];
  const std::vector<int64_t>&qd = shapes[0], &kd = shapes[1], &vd = shapes[2];
  if (qd.size() != 3 || kd.size() != 3 || vd != kd || kd[0] != qd[0] || kd[2] != qd[2])
    return g_api->CreateStatus(ORT_INVALID_ARGUMENT,
                               "ai.sdrt.Attention: Q must be [B, S, hidden], K and V [B, L, hidden] alike");
  if (qd[2] % k.heads != 0) {
    const std::string msg = "ai.sdrt.Attention: hidden size " + std::to_string(qd[2]) + " is not a multiple of " +
                            std::to_string(k.heads) + " heads";
    return g_api->CreateStatus(ORT_INVALID_ARGUMENT, msg.c_str());
  }
  sdrt::AttentionShape s{qd[0], qd[1], kd[1], k.heads, qd[2] / k.heads, k.scale};
  OrtValue* y = nullptr;
  SDRT_RETURN_IF_ERROR(g_api->KernelContext_GetOutput(context, 0, qd.data(), qd.size(), &y));
  if (s.b == 0 || s.s == 0) return nullptr;
  if (s.l == 0) return g_api->CreateStatus(ORT_INVALID_ARGUMENT, "ai.sdrt.Attention: K and V hold no tokens");
  const float *qp = nullptr, *kp = nullptr, *vp = nullptr;
  float* yp = nullptr;
  SDRT_RETURN_IF_ERROR(input_data(q, &qp));
  SDRT_RETURN_IF_ERROR(input_data(key, &kp));
  SDRT_RETURN_IF_ERROR(input_data(value, &vp));
  SDRT_RETURN_IF_ERROR(g_api->GetTensorMutableData(y, reinterpret_cast<void**>(&yp)));
  const char* oom = "ai.sdrt.Attention: out of memory for the packed keys and values";
  try {
    sdrt::AttentionJob job(s, qp, kp, vp, yp, k.math);
    AttentionCall call{&job};
    SDRT_RETURN_IF_ERROR(g_api->KernelContext_ParallelFor(context, attention_task<&sdrt::AttentionJob::pack_task>,
                                                          static_cast<size_t>(job.pack_tasks()), 0, &call));
    if (!call.failed)
      SDRT_RETURN_IF_ERROR(g_api->KernelContext_ParallelFor(context, attention_task<&sdrt::AttentionJob::run_task>,
                                                            static_cast<size_t>(job.tasks()), 0, &call));
    return call.failed ? g_api->CreateStatus(ORT_FAIL, oom) : nullptr;
  } catch (const std::bad_alloc&) {
    return g_api->CreateStatus(ORT_FAIL, oom);
  }
}

OrtStatus* ORT_API_CALL attention_create(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info,
                                         void** kernel) {
  auto* k = new AttentionKernel();
  int64_t math = 0;
  attribute_int(info, "num_heads", 0, &k->heads);
  attribute_float(info, "scale", 0.0f, &k->scale);
  attribute_int(info, "math", 0, &math);
  if (k->heads <= 0 || math < 0 || math > 1) {
    delete k;
    return g_api->CreateStatus(ORT_INVALID_ARGUMENT,
                               "ai.sdrt.Attention: 'num_heads' must be positive and 'math' 0 (auto) or 1 (float32)");
  }
  k->math = math == 1 ? sdrt::AttentionMath::kFloat32 : sdrt::AttentionMath::kAuto;
  *kernel = k;
  return nullptr;
}

OrtStatus* ORT_API_CALL attention_compute_v2(void* kernel, OrtKernelContext* context) {
  return attention_compute(*static_cast<AttentionKernel*>(kernel), context);
}

void ORT_API_CALL attention_destroy(void* kernel) { delete static_cast<AttentionKernel*>(kernel); }

// -- Conv3x3 --------------------------------------------------------------------------------------

struct Conv3x3Call {
  sdrt::Conv3x3Job* job;
  int64_t chunk = 0;
  std::atomic<bool> failed{false};
};

template <void (sdrt::Conv3x3Job::*kTask)(int64_t, int64_t)>
void conv3x3_chunk_task(void* data, size_t task) {
  auto* call = static_cast<Conv3x3Call*>(data);
  try {
    (call->job->*kTask)(call->chunk, static_cast<int64_t>(task));
  } catch (...) {
    call->failed = true;
  }
}

void conv3x3_filter_task(void* data, size_t task) {
  auto* call = static_cast<Conv3x3Call*>(data);
  try {
    call->job->filter_task(static_cast<int64_t>(task));
  } catch (...) {
    call->failed = true;
  }
}

OrtStatus* conv3x3_compute(OrtKernelContext* context) {
  const OrtValue* in[3] = {};
  std::vector<int64_t> shapes[3];
  SDRT_RETURN_IF_ERROR(three_inputs(context, in, shapes));
  const std::vector<int64_t>&xd = shapes[0], &wd = shapes[1], &bd = shapes[2];
  if (xd.size() != 4 || wd.size() != 4 || wd[2] != 3 || wd[3] != 3 || wd[1] != xd[1] || bd.size() != 1 ||
      bd[0] != wd[0])
    return g_api->CreateStatus(ORT_INVALID_ARGUMENT,
                               "ai.sdrt.Conv3x3: X must be [N, C, H, W], W [K, C, 3, 3] and B [K]");
  sdrt::Conv3x3Shape s{xd[0], xd[1], xd[2], xd[3], wd[0]};
  const std::vector<int64_t> yd{s.n, s.k, s.h, s.w};
  OrtValue* y = nullptr;
  SDRT_RETURN_IF_ERROR(g_api->KernelContext_GetOutput(context, 0, yd.data(), yd.size(), &y));
  if (s.n == 0 || s.h == 0 || s.w == 0) return nullptr;
  const float *xp = nullptr, *wp = nullptr, *bp = nullptr;
  float* yp = nullptr;
  SDRT_RETURN_IF_ERROR(input_data(in[0], &xp));
  SDRT_RETURN_IF_ERROR(input_data(in[1], &wp));
  SDRT_RETURN_IF_ERROR(input_data(in[2], &bp));
  SDRT_RETURN_IF_ERROR(g_api->GetTensorMutableData(y, reinterpret_cast<void**>(&yp)));
  const char* oom = "ai.sdrt.Conv3x3: out of memory for the transformed filters and tiles";
  try {
    // One scratch for the process, grown to the largest call: sessions run their nodes one at a
    // time, and a call that finds it busy (another session's, at the same moment) allocates its own
    static std::mutex shared_mutex;
    static std::vector<float> shared;
    std::unique_lock<std::mutex> lock(shared_mutex, std::try_to_lock);
    std::vector<float> own;
    sdrt::Conv3x3Job job(s, xp, wp, bp, yp, lock.owns_lock() ? shared : own);
    Conv3x3Call call{&job};
    SDRT_RETURN_IF_ERROR(g_api->KernelContext_ParallelFor(context, conv3x3_filter_task,
                                                          static_cast<size_t>(job.filter_tasks()), 0, &call));
    for (int64_t chunk = 0; chunk < job.chunks() && !call.failed; ++chunk) {
      call.chunk = chunk;
      SDRT_RETURN_IF_ERROR(g_api->KernelContext_ParallelFor(
          context, conv3x3_chunk_task<&sdrt::Conv3x3Job::input_task>, static_cast<size_t>(job.input_tasks(chunk)),
          0, &call));
      SDRT_RETURN_IF_ERROR(g_api->KernelContext_ParallelFor(
          context, conv3x3_chunk_task<&sdrt::Conv3x3Job::product_task>,
          static_cast<size_t>(job.product_tasks(chunk)), 0, &call));
      SDRT_RETURN_IF_ERROR(g_api->KernelContext_ParallelFor(
          context, conv3x3_chunk_task<&sdrt::Conv3x3Job::output_task>,
          static_cast<size_t>(job.output_tasks(chunk)), 0, &call));
    }
    return call.failed ? g_api->CreateStatus(ORT_FAIL, oom) : nullptr;
  } catch (const std::bad_alloc&) {
    return g_api->CreateStatus(ORT_FAIL, oom);
  }
}

OrtStatus* ORT_API_CALL conv3x3_create(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void** kernel) {
  *kernel = nullptr;  // no attributes: padding 1, stride 1 are the op's definition
  return nullptr;
}

OrtStatus* ORT_API_CALL conv3x3_compute_v2(void*, OrtKernelContext* context) { return conv3x3_compute(context); }

void ORT_API_CALL conv3x3_destroy(void*) {}

// -- the OrtCustomOp table ------------------------------------------------------------------------

const char* ORT_API_CALL group_norm_name(const OrtCustomOp*) { return "GroupNorm"; }
const char* ORT_API_CALL attention_name(const OrtCustomOp*) { return "Attention"; }
const char* ORT_API_CALL conv3x3_name(const OrtCustomOp*) { return "Conv3x3"; }
const char* ORT_API_CALL cpu_provider(const OrtCustomOp*) { return "CPUExecutionProvider"; }
const char* ORT_API_CALL cuda_provider(const OrtCustomOp*) { return "CUDAExecutionProvider"; }
ONNXTensorElementDataType ORT_API_CALL float_type(const OrtCustomOp*, size_t) {
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
// float16 data (X, Y) with float32 gamma and beta (inputs 1, 2)
ONNXTensorElementDataType ORT_API_CALL half_input_type(const OrtCustomOp*, size_t index) {
  return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
ONNXTensorElementDataType ORT_API_CALL half_type(const OrtCustomOp*, size_t) {
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}
size_t ORT_API_CALL three(const OrtCustomOp*) { return 3; }
size_t ORT_API_CALL one(const OrtCustomOp*) { return 1; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType ORT_API_CALL default_memory(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL variadic_arity(const OrtCustomOp*) { return 1; }
int ORT_API_CALL variadic_homogeneous(const OrtCustomOp*) { return 1; }
int ORT_API_CALL start_version(const OrtCustomOp*) { return 1; }
int ORT_API_CALL end_version(const OrtCustomOp*) { return 1; }
size_t ORT_API_CALL no_pairs(int** a, int** b) {
  *a = nullptr;
  *b = nullptr;
  return 0;
}
void ORT_API_CALL release_pairs(int*, int*) {}

using ProviderFn = const char*(ORT_API_CALL*)(const OrtCustomOp*);
using TypeFn = ONNXTensorElementDataType(ORT_API_CALL*)(const OrtCustomOp*, size_t);

// An op of three required inputs and one output
OrtCustomOp make_op(const char*(ORT_API_CALL* name)(const OrtCustomOp*), ProviderFn provider, TypeFn input_type,
                    TypeFn output_type,
                    OrtStatus*(ORT_API_CALL* create)(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void**),
                    OrtStatus*(ORT_API_CALL* compute)(void*, OrtKernelContext*), void(ORT_API_CALL* destroy)(void*)) {
  OrtCustomOp op;
  std::memset(&op, 0, sizeof(op));
  op.version = kApiVersion;
  op.GetName = name;
  op.GetExecutionProviderType = provider;
  op.GetInputType = input_type;
  op.GetInputTypeCount = three;
  op.GetOutputType = output_type;
  op.GetOutputTypeCount = one;
  op.GetInputCharacteristic = required;
  op.GetOutputCharacteristic = required;
  op.GetInputMemoryType = default_memory;
  op.GetVariadicInputMinArity = variadic_arity;
  op.GetVariadicInputHomogeneity = variadic_homogeneous;
  op.GetVariadicOutputMinArity = variadic_arity;
  op.GetVariadicOutputHomogeneity = variadic_homogeneous;
  op.CreateKernelV2 = create;
  op.KernelComputeV2 = compute;
  op.KernelDestroy = destroy;
  op.InferOutputShapeFn = nullptr;  // Y has X's (Q's) shape: declared in the graph by the pass
  op.GetStartVersion = start_version;
  op.GetEndVersion = end_version;
  op.GetMayInplace = no_pairs;
  op.ReleaseMayInplace = release_pairs;
  op.GetAliasMap = no_pairs;
  op.ReleaseAliasMap = release_pairs;
  return op;
}

OrtCustomOp make_group_norm_op(ProviderFn provider, TypeFn input_type, TypeFn output_type) {
  return make_op(group_norm_name, provider, input_type, output_type, group_norm_create, group_norm_compute_v2,
                 group_norm_destroy);
}

const OrtCustomOp kGroupNorm = make_group_norm_op(cpu_provider, float_type, float_type);
const OrtCustomOp kAttention = make_op(attention_name, cpu_provider, float_type, float_type, attention_create,
                                       attention_compute_v2, attention_destroy);
const OrtCustomOp kConv3x3 = make_op(conv3x3_name, cpu_provider, float_type, float_type, conv3x3_create,
                                     conv3x3_compute_v2, conv3x3_destroy);
#ifdef SDRT_WITH_CUDA
const OrtCustomOp kGroupNormCuda = make_group_norm_op(cuda_provider, float_type, float_type);
const OrtCustomOp kGroupNormCudaHalf = make_group_norm_op(cuda_provider, half_input_type, half_type);
#endif

}  // namespace

extern "C" SDRT_API OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  g_api = base->GetApi(kApiVersion);
  if (g_api == nullptr) return nullptr;  // cannot report without an API: the session then fails on the op
  OrtCustomOpDomain* domain = nullptr;
  SDRT_RETURN_IF_ERROR(g_api->CreateCustomOpDomain(kDomain, &domain));
  SDRT_RETURN_IF_ERROR(g_api->CustomOpDomain_Add(domain, &kGroupNorm));
  SDRT_RETURN_IF_ERROR(g_api->CustomOpDomain_Add(domain, &kAttention));
  SDRT_RETURN_IF_ERROR(g_api->CustomOpDomain_Add(domain, &kConv3x3));
#ifdef SDRT_WITH_CUDA
  SDRT_RETURN_IF_ERROR(g_api->CustomOpDomain_Add(domain, &kGroupNormCuda));
  SDRT_RETURN_IF_ERROR(g_api->CustomOpDomain_Add(domain, &kGroupNormCudaHalf));
#endif
  // The domain must outlive every session that uses it: it is kept for the process's lifetime
  return g_api->AddCustomOpDomain(options, domain);
}
