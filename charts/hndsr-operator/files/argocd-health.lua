-- Argo CD health check for hndsr.io/HndsrService.
-- Key in argocd-cm: resource.customizations.health.hndsr.io_HndsrService
hs = {}
hs.status = "Progressing"
hs.message = "Waiting for the operator to report status"
if obj.status == nil then
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration ~= nil
    and obj.status.observedGeneration < obj.metadata.generation then
  hs.message = "Waiting for the operator to observe generation " .. obj.metadata.generation
  return hs
end
local ready = nil
local degraded = nil
if obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    if c.type == "Ready" then ready = c end
    if c.type == "Degraded" then degraded = c end
  end
end
-- Problems a human must fix. Waiting for GPU capacity stays Progressing:
-- node autoscaling usually resolves it. Degraded carries RollingOut only
-- once the Deployment has exceeded its progress deadline.
local broken = {
  InvalidSpec = true, PodFailing = true, PodCreationFailed = true, Unschedulable = true,
  RollingOut = true, KedaNotConfigured = true, KedaNotInstalled = true,
  AutoscalerNotReady = true,
}
if degraded ~= nil and degraded.status == "True" and broken[degraded.reason] then
  hs.status = "Degraded"
  hs.message = degraded.reason .. ": " .. (degraded.message or "")
  return hs
end
if ready ~= nil then
  if ready.status == "True" then
    hs.status = "Healthy"
  elseif ready.reason == "ScaledToZero" then
    hs.status = "Suspended"
  elseif ready.reason == "InvalidSpec" then
    hs.status = "Degraded"
  end
  hs.message = ready.reason .. ": " .. (ready.message or "")
end
return hs
