// One scenario of the official OpenAI Node SDK against tiergate; prints what the SDK saw as JSON.
//   node client.mjs BASE_URL chat|stream|rate_limit|retries
import OpenAI from "openai";

const [baseURL, scenario] = process.argv.slice(2);
const messages = [{ role: "user", content: "hi" }];
const client = new OpenAI({ baseURL, apiKey: "sk-client", maxRetries: scenario === "retries" ? 2 : 0, timeout: 20000 });
const out = {};
try {
  if (scenario === "chat") {
    const answer = await client.chat.completions.create({ model: "general_purpose", messages });
    out.content = answer.choices[0].message.content;
    out.requestId = answer._request_id;
  } else if (scenario === "stream") {
    const stream = await client.chat.completions.create({ model: "general_purpose", messages, stream: true });
    const parts = [];
    for await (const chunk of stream) parts.push(chunk.choices[0]?.delta?.content ?? "");
    out.content = parts.join("");
    out.chunks = parts.length;
  } else {
    await client.chat.completions.create({ model: "general_purpose", messages });
  }
} catch (err) {
  out.error = err.constructor.name;
  out.status = err.status ?? null;
  out.retryAfter = err.headers?.get?.("retry-after") ?? err.headers?.["retry-after"] ?? null;
  out.message = String(err.message ?? err);
}
console.log(JSON.stringify(out));
