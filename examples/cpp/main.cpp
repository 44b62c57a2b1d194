// Runs real MoE layers on the CPU through fusedmoe.hpp and checks them against a naive float64
// reference written from SPEC.md §2-3; then checks that a bad call throws fusedmoe::Error.
// Exits non-zero on any failure. CTest runs it (see CMakeLists.txt).

#include "fusedmoe.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using fusedmoe::Activation;
using fusedmoe::bf16;

// ---- bf16 <-> float ----------------------------------------------------------------------

float float_from_bf16(bf16 v) {
    const uint32_t bits = static_cast<uint32_t>(v.bits) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// Round to nearest, ties to even: add just under half an ulp of bf16, plus one when the kept
// lowest bit is odd, then truncate.
bf16 bf16_from_float(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    if (std::isnan(f)) return bf16{static_cast<uint16_t>((bits >> 16) | 0x0040)};  // stay NaN
    const uint32_t lowest_kept_bit = (bits >> 16) & 1;
    return bf16{static_cast<uint16_t>((bits + 0x7fff + lowest_kept_bit) >> 16)};
}

// ---- element types -------------------------------------------------------------------------

// How the test stores, reads and rounds one layer dtype.
template <class T> struct Elem;

template <> struct Elem<float> {
    static constexpr const char* name = "f32";
    static constexpr double tolerance = 1e-5;
    static constexpr moe_dtype dtype = fusedmoe::f32;
    static float from(double x) { return static_cast<float>(x); }
    static double value(float x) { return x; }
};

template <> struct Elem<bf16> {
    static constexpr const char* name = "bf16";
    static constexpr double tolerance = 1e-2;
    static constexpr moe_dtype dtype = fusedmoe::bfloat16;
    static bf16 from(double x) { return bf16_from_float(static_cast<float>(x)); }
    static double value(bf16 x) { return float_from_bf16(x); }
};

// The value the library stores at a rounding point of SPEC §2.
template <class T> double round_to(double x) { return Elem<T>::value(Elem<T>::from(x)); }

template <class T> T nan_value() { return Elem<T>::from(std::numeric_limits<double>::quiet_NaN()); }

// ---- reporting -----------------------------------------------------------------------------

class Checks {
public:
    void expect(bool ok, const std::string& what) {
        ++count_;
        if (!ok) ++failed_;
        std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
    }
    int failed() const { return failed_; }
    int count() const { return count_; }

private:
    int count_ = 0;
    int failed_ = 0;
};

std::string format_error(double error, double tolerance) {
    char text[96];
    std::snprintf(text, sizeof text, "rel. Frobenius error %.3g (<= %.0e)", error, tolerance);
    return text;
}

// ---- the problem ---------------------------------------------------------------------------

struct Case {
    const char* name;
    Activation activation;
    bool gated;
    float routed_scaling_factor;
};

struct Dims {
    int64_t experts = 8, top_k = 3, hidden = 64, intermediate = 48, tokens = 37;
};

int64_t rows_of_w13(const Dims& d, bool gated) {
    return gated ? 2 * d.intermediate : d.intermediate;
}

// Sizes are int64_t, as in the C ABI; vectors count in size_t.
std::size_t elements(int64_t n) { return static_cast<std::size_t>(n); }

// Token 0 loses all its routes (its out row must be zeros), others one route in seven.
bool route_is_dropped(int64_t token, int64_t route) { return token == 0 || route % 7 == 3; }

// One case's host memory: the weights the layer borrows and a batch.
template <class T> struct Problem {
    Dims d;
    int64_t n1;
    std::vector<T> w13, w2, b13, b2, hidden, out;
    std::vector<int32_t> topk_ids;
    std::vector<float> topk_weights;

    Problem(const Dims& dims, bool gated, std::mt19937& rng)
        : d(dims), n1(rows_of_w13(dims, gated)),
          w13(random_values(d.experts * n1 * d.hidden, 1.0 / std::sqrt(double(d.hidden)), rng)),
          w2(random_values(d.experts * d.hidden * d.intermediate,
                           1.0 / std::sqrt(double(d.intermediate)), rng)),
          b13(random_values(d.experts * n1, 0.1, rng)),
          b2(random_values(d.experts * d.hidden, 0.1, rng)),
          hidden(random_values(d.tokens * d.hidden, 1.0, rng)),
          out(elements(d.tokens * d.hidden)),
          topk_ids(random_routes(rng)),
          topk_weights(random_router_weights(rng)) {}

    static std::vector<T> random_values(int64_t n, double scale, std::mt19937& rng) {
        std::uniform_real_distribution<double> uniform(-scale, scale);
        std::vector<T> values(elements(n));
        for (T& v : values) v = Elem<T>::from(uniform(rng));
        return values;
    }

    // K distinct experts per token, some routes dropped (-1).
    std::vector<int32_t> random_routes(std::mt19937& rng) const {
        std::vector<int32_t> experts(elements(d.experts)), ids;
        std::iota(experts.begin(), experts.end(), 0);
        for (int64_t m = 0; m < d.tokens; ++m) {
            std::shuffle(experts.begin(), experts.end(), rng);
            for (int64_t k = 0; k < d.top_k; ++k)
                ids.push_back(route_is_dropped(m, m * d.top_k + k) ? -1 : experts[k]);
        }
        return ids;
    }

    std::vector<float> random_router_weights(std::mt19937& rng) const {
        std::uniform_real_distribution<float> uniform(0.1f, 1.0f);
        std::vector<float> weights(elements(d.tokens * d.top_k));
        for (float& w : weights) w = uniform(rng);
        return weights;
    }

    double at(const std::vector<T>& v, int64_t i) const { return Elem<T>::value(v[i]); }

    fusedmoe::Tensor w13_tensor() { return {w13.data(), {d.experts, n1, d.hidden}}; }
    fusedmoe::Tensor w2_tensor() { return {w2.data(), {d.experts, d.hidden, d.intermediate}}; }
    fusedmoe::Tensor b13_tensor() { return {b13.data(), {d.experts, n1}}; }
    fusedmoe::Tensor b2_tensor() { return {b2.data(), {d.experts, d.hidden}}; }
    fusedmoe::Tensor ids_tensor() { return {topk_ids.data(), {d.tokens, d.top_k}}; }
    fusedmoe::Tensor hidden_tensor() { return {hidden.data(), {d.tokens, d.hidden}}; }
    fusedmoe::Tensor weights_tensor() { return {topk_weights.data(), {d.tokens, d.top_k}}; }
    fusedmoe::Tensor out_tensor() { return {out.data(), {d.tokens, d.hidden}}; }

    void poison_out() { std::fill(out.begin(), out.end(), nan_value<T>()); }
};

// ---- the float64 reference (SPEC §2-3) --------------------------------------------------------

double silu(double x) { return x / (1.0 + std::exp(-x)); }

// SPEC §3 for the activations the cases use; g is the gate (or the only input), u the up.
double activation(Activation act, bool gated, double g, double u) {
    switch (act) {
    case Activation::silu: return gated ? silu(g) * u : silu(g);
    case Activation::relu2: return std::max(g, 0.0) * std::max(g, 0.0);
    default: throw std::logic_error("the reference lacks this activation");
    }
}

// One route's y_mk [H] (SPEC §2), router weight applied after GEMM2 and its bias.
template <class T>
std::vector<double> route_output(const Case& c, const Problem<T>& p, int64_t m, int64_t e,
                                 double router_weight) {
    const Dims& d = p.d;
    std::vector<double> g1(elements(p.n1)), a(elements(d.intermediate));
    for (int64_t n = 0; n < p.n1; ++n) {
        double sum = p.at(p.b13, e * p.n1 + n);
        for (int64_t h = 0; h < d.hidden; ++h)
            sum += p.at(p.hidden, m * d.hidden + h) * p.at(p.w13, (e * p.n1 + n) * d.hidden + h);
        g1[n] = round_to<T>(sum);
    }
    for (int64_t j = 0; j < d.intermediate; ++j) {
        const double up = c.gated ? g1[d.intermediate + j] : 0.0;  // halves layout
        a[j] = round_to<T>(activation(c.activation, c.gated, g1[j], up));
    }
    std::vector<double> y(elements(d.hidden));
    for (int64_t h = 0; h < d.hidden; ++h) {
        double sum = p.at(p.b2, e * d.hidden + h);
        for (int64_t j = 0; j < d.intermediate; ++j)
            sum += a[j] * p.at(p.w2, (e * d.hidden + h) * d.intermediate + j);
        y[h] = round_to<T>(sum * router_weight);
    }
    return y;
}

// out [M, H]: the scaled sum over a token's routes; a dropped route contributes zero.
template <class T> std::vector<double> reference(const Case& c, const Problem<T>& p) {
    const Dims& d = p.d;
    std::vector<double> out(elements(d.tokens * d.hidden));
    for (int64_t m = 0; m < d.tokens; ++m) {
        std::vector<double> sum(elements(d.hidden), 0.0);
        for (int64_t k = 0; k < d.top_k; ++k) {
            const int64_t route = m * d.top_k + k, e = p.topk_ids[route];
            if (e < 0) continue;
            const std::vector<double> y = route_output(c, p, m, e, p.topk_weights[route]);
            for (int64_t h = 0; h < d.hidden; ++h) sum[h] += y[h];
        }
        for (int64_t h = 0; h < d.hidden; ++h)
            out[m * d.hidden + h] = round_to<T>(c.routed_scaling_factor * sum[h]);
    }
    return out;
}

// ‖out − ref‖ / ‖ref‖; NaN anywhere in out makes it NaN, which no tolerance passes.
template <class T>
double relative_error(const std::vector<T>& out, const std::vector<double>& ref) {
    double diff = 0, norm = 0;
    for (std::size_t i = 0; i < ref.size(); ++i) {
        const double delta = Elem<T>::value(out[i]) - ref[i];
        diff += delta * delta;
        norm += ref[i] * ref[i];
    }
    return std::sqrt(diff / norm);
}

// ---- the library side ----------------------------------------------------------------------

template <class T> fusedmoe::Config make_config(const Case& c, const Dims& d) {
    fusedmoe::Config config;
    config.set_num_experts(d.experts)
        .set_top_k(d.top_k)
        .set_hidden_size(d.hidden)
        .set_intermediate_size(d.intermediate)
        .set_dtype(Elem<T>::dtype)
        .set_activation(c.activation)
        .set_gated(c.gated)
        .set_routed_scaling_factor(c.routed_scaling_factor)
        .set_option("cpu.num_threads", "2");
    return config;
}

template <class T> fusedmoe::Layer make_layer(const Case& c, Problem<T>& p) {
    // The config is a temporary: the layer keeps its own copy.
    return fusedmoe::Layer(make_config<T>(c, p.d), p.w13_tensor(), p.w2_tensor(),
                           p.b13_tensor(), p.b2_tensor());
}

std::string case_title(const char* dtype, const Case& c) {
    return std::string(dtype) + " " + c.name;
}

// The layer's own config reads back what was set.
void check_layer_config(Checks& checks, const fusedmoe::Layer& layer, const Case& c,
                        const Dims& d, const std::string& title) {
    const fusedmoe::ConfigView config = layer.config();
    checks.expect(config.top_k() == d.top_k && config.hidden_size() == d.hidden &&
                      config.num_local_experts() == d.experts &&
                      config.activation() == c.activation && config.gated() == c.gated &&
                      config.option("cpu.num_threads") == "2" && !config.gemm1_limit(),
                  title + ": layer config reads back");
}

// Dropped routes are not sorted in; the used entries fill whole blocks.
template <class T>
void check_plan(Checks& checks, const fusedmoe::Plan& plan, const Problem<T>& p,
                const std::string& title) {
    const int64_t routes = p.d.tokens * p.d.top_k, padded = plan.num_padded();
    const std::vector<int32_t> sorted = plan.sorted_route_ids();
    const auto kept = std::count_if(p.topk_ids.begin(), p.topk_ids.end(),
                                    [](int32_t e) { return e >= 0; });
    const auto sorted_in = std::count_if(sorted.begin(), sorted.begin() + padded,
                                         [&](int32_t r) { return r < routes; });
    checks.expect(plan.num_tokens() == p.d.tokens && padded % plan.tile_config().block_m == 0 &&
                      sorted_in == kept,
                  title + ": plan holds the " + std::to_string(kept) + " kept routes");
}

template <class T> void check_case(Checks& checks, const Case& c, unsigned seed) {
    const std::string title = case_title(Elem<T>::name, c);
    std::mt19937 rng(seed);
    Problem<T> p(Dims{}, c.gated, rng);
    const fusedmoe::Layer layer = make_layer(c, p);
    check_layer_config(checks, layer, c, p.d, title);

    fusedmoe::Workspace workspace(layer.workspace_size(p.d.tokens));
    fusedmoe::Plan plan(layer);
    plan.prepare(layer, p.ids_tensor(), workspace.tensor());
    check_plan(checks, plan, p, title);

    p.poison_out();
    plan.run(layer, p.hidden_tensor(), p.weights_tensor(), p.out_tensor());
    const double error = relative_error(p.out, reference(c, p));
    checks.expect(error <= Elem<T>::tolerance,
                  title + ": " + format_error(error, Elem<T>::tolerance));
}

// A hidden of the wrong shape is refused by name, and out is left untouched.
void check_bad_hidden_throws(Checks& checks, const Case& c) {
    std::mt19937 rng(7);
    Problem<float> p(Dims{}, c.gated, rng);
    const fusedmoe::Layer layer = make_layer(c, p);
    fusedmoe::Workspace workspace(layer.workspace_size(p.d.tokens));
    fusedmoe::Plan plan(layer);
    plan.prepare(layer, p.ids_tensor(), workspace.tensor());

    std::vector<float> wide_hidden(elements(p.d.tokens * (p.d.hidden + 1)), 1.0f);
    const fusedmoe::Tensor wrong_shape(wide_hidden.data(), {p.d.tokens, p.d.hidden + 1});
    p.poison_out();
    try {
        plan.run(layer, wrong_shape, p.weights_tensor(), p.out_tensor());
        checks.expect(false, "hidden [M, H+1]: moe_run did not throw");
    } catch (const fusedmoe::Error& e) {
        const bool out_untouched =
            std::all_of(p.out.begin(), p.out.end(), [](float v) { return std::isnan(v); });
        checks.expect(e.status() == MOE_ERR_INVALID_ARGUMENT &&
                          std::string(e.what()).find("hidden") != std::string::npos &&
                          out_untouched,
                      std::string("hidden [M, H+1] throws: ") + e.what());
    }
}

// Round to nearest even, checked on exact values, ties both ways, and NaN.
void check_bf16_conversion(Checks& checks) {
    const float tie_to_even_below = 1.0f + 0x1p-8f;       // halfway between 1 and 1+2^-7
    const float tie_to_even_above = 1.0f + 3 * 0x1p-8f;   // halfway between 1+2^-7 and 1+2^-6
    const float above_tie = 1.0f + 0x1p-8f + 0x1p-20f;
    checks.expect(float_from_bf16(bf16_from_float(1.5f)) == 1.5f &&
                      float_from_bf16(bf16_from_float(tie_to_even_below)) == 1.0f &&
                      float_from_bf16(bf16_from_float(tie_to_even_above)) == 1.0f + 0x1p-6f &&
                      float_from_bf16(bf16_from_float(above_tie)) == 1.0f + 0x1p-7f &&
                      std::isnan(float_from_bf16(bf16_from_float(std::nanf("")))),
                  "bf16 conversion rounds to nearest even");
}

void check_all(Checks& checks) {
    const Case cases[] = {
        {"silu, gated, biases, dropped routes", Activation::silu, true, 1.0f},
        {"relu2, not gated, biases, dropped routes, scaling 2.5", Activation::relu2, false, 2.5f},
    };
    check_bf16_conversion(checks);
    unsigned seed = 1;
    for (const Case& c : cases) {
        check_case<float>(checks, c, seed++);
        check_case<bf16>(checks, c, seed++);
    }
    check_bad_hidden_throws(checks, cases[0]);
}

}  // namespace

int main() {
    Checks checks;
    try {
        fusedmoe::check_abi_version();
        check_all(checks);
    } catch (const std::exception& e) {
        std::printf("FAIL unexpected exception: %s\n", e.what());
        return 1;
    }
    std::printf("fusedmoe %s, C++ host: %d checks, %d failed\n", fusedmoe::version().c_str(),
                checks.count(), checks.failed());
    return checks.failed() == 0 ? 0 : 1;
}
