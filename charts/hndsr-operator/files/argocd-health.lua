-- Argo CD health check for hndsr.io/HndsrService.
-- Key in argocd-cm: resource.customizations.health.hndsr.io_HndsrService
--
-- Healthy means "the operator has acted on this generation and the service
-- serves it": a status written for an older generation never counts.
hs = {}
hs.status = "Progressing"
hs.message = "Waiting for the operator to report status"
if obj.status == nil then
  return hs
end
local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end
local ready = nil
local progressing = nil
local degraded = nil
if obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    if c.type == "Ready" then ready = c end
    if c.type == "Progressing" then progressing = c end
    if c.type == "Degraded" then degraded = c end
  end
end
local function describe(c)
  return c.reason .. ": " .. (c.message or "")
end
-- Problems a human must fix. Waiting for GPU capacity is not one of them:
-- it stays Progressing, since node autoscaling usually resolves it (the
-- operator's reason and message say what is missing). RollingOut is
-- Degraded only once the Deployment has exceeded its progress deadline.
local broken = {
  InvalidSpec = true, PodFailing = true, PodCreationFailed = true, Unschedulable = true,
  RollingOut = true, KedaNotConfigured = true, KedaNotInstalled = true,
  AutoscalerNotReady = true,
}
if degraded ~= nil and degraded.status == "True" and broken[degraded.reason] then
  hs.status = "Degraded"
  hs.message = describe(degraded)
  return hs
end
if ready == nil then
  hs.message = "Waiting for the operator to report the Ready condition"
  return hs
end
if ready.reason == "InvalidSpec" then
  hs.status = "Degraded"
  hs.message = describe(ready)
  return hs
end
if ready.status ~= "True" then
  if ready.reason == "ScaledToZero" then
    hs.status = "Suspended"
  end
  hs.message = describe(ready)
  return hs
end
-- Serving. The spec is in effect only once its serving pods are: a new
-- template rolling out, capacity being added or a model loading stays
-- Progressing. Standby pods filling up (prewarm) does not hold it back.
local serving_work = {
  Creating = true, RollingOut = true, LoadingModel = true, WaitingForGPUCapacity = true,
}
if progressing ~= nil and progressing.status == "True" and serving_work[progressing.reason] then
  hs.message = describe(progressing)
  return hs
end
hs.status = "Healthy"
hs.message = describe(ready)
return hs
